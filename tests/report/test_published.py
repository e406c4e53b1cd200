"""Published reference values: dataset mapping, precision, sources."""

from duplus.report import published as pub


def test_dataset_mapping_by_name():
    assert pub.benchmark_for("btcv") == "BTCV"
    assert pub.benchmark_for("AMOS_CT") == "AMOS22"
    assert pub.benchmark_for("kits19") == "KiTS23"
    assert pub.benchmark_for("lits") == "LiTS"
    assert pub.benchmark_for("msd-task03-liver") == "LiTS"
    assert pub.benchmark_for("demo_abdomen_ct") is None
    assert pub.published_dice("demo_abdomen_ct") == {}


def test_published_dice_values_at_published_precision():
    expected = {"btcv": (83.08, 78.89), "amos_ct": (88.64, 83.81), "kits19": (86.04, 81.27), "lits": (80.09, 76.50)}
    for dataset, (nnunet, swin) in expected.items():
        values = pub.published_dice(dataset)
        assert values["nnU-Net"].text() == f"{nnunet / 100:.4f}"
        assert values["Swin-UNETR"].text() == f"{swin / 100:.4f}"
        assert "nnU-Net Revisited" in values["nnU-Net"].source


def test_prognosis_and_efficiency_references():
    texts = {v.model: v.text() for v in pub.PROGNOSIS}
    assert texts == {"HECKTOR 2021 best": "0.720", "HECKTOR 2022 best": "0.682", "DuPLUS (paper)": "0.69 ± 0.02"}
    by_model = {e.model: e for e in pub.EFFICIENCY}
    assert by_model["Swin-UNETR (feature size 48)"].params_m == 62.19
    assert by_model["Swin-UNETR (feature size 48)"].gmacs == 321.0
    assert by_model["CLIP-Driven Universal Model (U-Net)"].params_m == 19.08
    total = by_model["TotalSegmentator (1.5 mm)"]
    assert (total.seconds_per_volume, total.device) == (77.0, "RTX 3090")
    assert all(e.source for e in pub.EFFICIENCY) and all(v.source for v in pub.PROGNOSIS)


def test_every_published_dice_states_its_definition():
    for dataset in ("btcv", "amos_ct", "kits19", "lits"):
        for value in pub.published_dice(dataset).values():
            assert "nnU-Net's evaluation" in value.definition and "absent from both" in value.definition
    notes = pub.definition_notes(v for d in ("btcv", "lits") for v in pub.published_dice(d).values())
    assert len(notes) == 1  # one source, one metric: said once however many values it gave
