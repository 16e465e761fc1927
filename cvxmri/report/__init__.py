"""The report of a `cvxmri reproduce` folder: figures (matplotlib) and one HTML and one
Markdown document, built only from the JSON, CSV, NumPy and model files in the folder."""
