"""Data in: fastMRI HDF5 files, the k-space simulator and the preparation of slices."""
