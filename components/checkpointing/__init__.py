from components.checkpointing.student import load_student, save_student, student_metadata
from components.checkpointing.teacher import hf_teacher
from components.errors import CheckpointError

__all__ = ["CheckpointError", "hf_teacher", "load_student", "save_student", "student_metadata"]
