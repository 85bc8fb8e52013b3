from components.checkpointing.hf_bert import CheckpointError
from components.checkpointing.student import load_student, save_student

__all__ = ["CheckpointError", "load_student", "save_student"]
