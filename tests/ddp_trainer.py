"""The quiet CPU Trainer the DDP scripts (tests/ddp_*.py) run with N processes."""

import lightning as L


def ddp_trainer(devices: int, **overrides) -> L.Trainer:
    """A CPU Trainer over ``devices`` processes (Lightning's ddp launcher when > 1) that logs, prints and saves nothing."""
    settings = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **overrides})
