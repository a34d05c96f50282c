"""Classical algorithms that answer GMM tasks through the Solver interface: EM and the spectral method."""
from pipeline.algorithms.em import EMPaper, EMResult, EMStrong, em_fit, kmeans_plusplus
from pipeline.algorithms.spectral import Spectral, tensor_power_decomposition

__all__ = ["EMPaper", "EMStrong", "EMResult", "em_fit", "kmeans_plusplus", "Spectral", "tensor_power_decomposition"]
