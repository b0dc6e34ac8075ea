"""What was found: a study's runs -> tidy tables -> statistics, figures, index.html.

collect.py (reads MLflow and Optuna) -> tables.py (the saved Parquet/CSV tables and their manifest)
-> stats.py (aggregation policy, tests) and figures.py (seaborn) -> html.py -> build.py (writes the
folder, logs it to MLflow). dashboard.py serves the live stores (MLflow UI, optuna-dashboard).
"""
