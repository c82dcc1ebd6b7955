"""Attribution: which components drive a reward. IPG and its baselines, as one LightningModule.

- :mod:`~ipg_lightning.attribution.module`: :class:`IPGAttribution` (the Lightning loop) and
  :func:`run_attribution`;
- :mod:`~ipg_lightning.attribution.methods`: one strategy class per method (IPG and the baselines);
- :mod:`~ipg_lightning.attribution.estimator`: advantages, quadrature, the path integral (pure);
- :mod:`~ipg_lightning.attribution.paths`: integration over fixed trajectories along every path;
- :mod:`~ipg_lightning.attribution.activations`: activation statistics for the activation baselines;
- :mod:`~ipg_lightning.attribution.accumulator`: DDP-reducible sums;
- :mod:`~ipg_lightning.attribution.report` and :mod:`~ipg_lightning.attribution.plots`: the report and its figure.
"""

from ipg_lightning.attribution.methods import METHODS, AttributionMethod
from ipg_lightning.attribution.module import IPGAttribution, run_attribution
from ipg_lightning.attribution.report import AttributionReport, UninformativeReportError

__all__ = ["METHODS", "AttributionMethod", "AttributionReport", "IPGAttribution", "UninformativeReportError", "run_attribution"]
