"""cvxmri: undersampled MRI reconstruction with CNNs trained layer-wise by convex programs."""

__version__ = "0.1.0"
