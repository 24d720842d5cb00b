"""Whether two models speak the same vocabulary token for token: what distillation (teacher and
student) and speculative decoding (target and draft) both need."""

from __future__ import annotations

from leapllm.errors import InvalidRequestError


def check_same_vocabulary(teacher, student, teacher_tokenizer=None,
                          student_tokenizer=None) -> None:
    """Distillation compares the two output distributions token by token: the vocabularies must match."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise InvalidRequestError(f"vocabulary mismatch: the teacher has {tv} tokens, the student {sv}; "
                                  "distillation needs the same tokenizer")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.vocab_size != student_tokenizer.vocab_size:
            raise InvalidRequestError(f"vocabulary mismatch: the teacher's tokenizer has {teacher_tokenizer.vocab_size} "
                                      f"tokens, the student's {student_tokenizer.vocab_size}")
        for i in range(teacher_tokenizer.vocab_size):
            if teacher_tokenizer.id_to_token(i) != student_tokenizer.id_to_token(i):
                raise InvalidRequestError(f"vocabulary mismatch: token {i} is {teacher_tokenizer.id_to_token(i)!r} "
                                          f"for the teacher, {student_tokenizer.id_to_token(i)!r} for the student")
