"""A warning category in a module that a worker imports only when a task does."""


class LateWarning(UserWarning):
    pass
