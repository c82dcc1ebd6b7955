"""Teacher-forced passes over trajectories: chunks by rows and tokens, the frozen prefix below the gates
replayed, the live blocks checkpointed, credit kept local (see :class:`TeacherForcedPasses`)."""

from ipg_lightning.rollout.passes.teacher_forced import MemoryLimits, TeacherForcedPasses

__all__ = ["MemoryLimits", "TeacherForcedPasses"]
