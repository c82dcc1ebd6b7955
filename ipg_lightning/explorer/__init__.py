"""See what a component does: an HTML explorer of an attribution report's kept trajectories.

``ipg explore REPORT_DIR`` (:func:`explore`) replays the trajectories an attribution kept
(``keep_trajectories: true``) through the model and writes one self-contained HTML page: the ranked
components, and for the top ones the trajectories where each is most active, every token shaded by
its activation or by its contribution to the IPG score; with steering vectors, each vector's
direction on the same trajectories.
"""

from ipg_lightning.explorer.page import embedded_payload, explore, page_for_report, render_page, write_page
from ipg_lightning.explorer.payload import Effects, MeasuredEffect, explorer_payload, read_evaluations
from ipg_lightning.explorer.traces import ComponentTrace, ScorePath, trace_components
from ipg_lightning.explorer.vector_traces import VectorTrace, trace_vectors

__all__ = [
    "ComponentTrace",
    "Effects",
    "MeasuredEffect",
    "ScorePath",
    "VectorTrace",
    "embedded_payload",
    "explore",
    "explorer_payload",
    "page_for_report",
    "read_evaluations",
    "render_page",
    "trace_components",
    "trace_vectors",
    "write_page",
]
