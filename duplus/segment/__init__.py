"""`duplus segment`: segment scans with free-text class prompts, masks on exactly the input grid."""
