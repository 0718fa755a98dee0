"""The ledger of the paper's results (paper-spec section 7): what is produced, ours beside the paper, the report.

``ledger`` loads the registry (ledger.yaml), ``metrics`` reads one number from a run directory's records,
``status`` says where each entry stands, ``run`` produces what entries need a time budget at a time, ``report``
writes results/REPORT.md.  The records live in results/<spec>/, ordinary mesacli run directories.
"""
