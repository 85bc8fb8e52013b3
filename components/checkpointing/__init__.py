from components.checkpointing.student import load_student, save_student, student_metadata
from components.errors import CheckpointError

__all__ = ["CheckpointError", "load_student", "save_student", "student_metadata"]
