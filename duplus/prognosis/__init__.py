"""Survival prognosis from DuPLUS image features and the EHR: ehr, tabular, sentence, features,
losses, heads (MLP_Prog), models, evaluate (cross-validation) and run (the Snakemake stage).
"""
