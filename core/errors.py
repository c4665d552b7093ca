"""User-facing errors: each names what was wrong and how to fix it."""


class LongEditError(ValueError):
    """An input problem the user can fix. The message says what and how."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} Fix: {fix}")
        self.problem = problem
        self.fix = fix
