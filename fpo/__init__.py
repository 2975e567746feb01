"""fpo: the training side of fpo-kernels: offline reference precompute, the training loop (FPO, DPO,
SimPO, TDPO1, TDPO2), evaluation and the demo. Entry points: `from fpo.precompute import precompute`,
`from fpo.train import train`, `from fpo.evaluate import evaluate`, and the `fpo` command (fpo.cli)."""

from fpo_kernels import __version__  # one version for the project

__all__ = ["__version__"]
