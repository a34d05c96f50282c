"""Task families: what is asked (sampler, targets, metrics helpers). One module per family."""
from pipeline.tasks.base import Solver
from pipeline.tasks.gmm import GMMBatch, GMMEstimate, make_generator, sample_gmm

__all__ = ["Solver", "GMMBatch", "GMMEstimate", "make_generator", "sample_gmm"]
