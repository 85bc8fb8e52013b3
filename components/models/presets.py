"""Named builders of a model class with other defaults (``minialbert_128``, ``mobilebert``...)."""

import functools
import inspect
from typing import Callable


def preset(cls: type, **defaults) -> Callable:
    """Decorate a stub ``def name(): "docstring"`` into a builder of ``cls`` with ``defaults``.

    The builder gets the class's full signature with these defaults, so ``help()`` shows every
    key and config checks catch a misspelt one before anything is loaded.
    """

    def decorate(fn):
        base = inspect.signature(cls)
        fn.__signature__ = base.replace(
            parameters=[
                p.replace(default=defaults[p.name]) if p.name in defaults else p for p in base.parameters.values()
            ],
            return_annotation=cls,
        )

        @functools.wraps(fn)
        def build(**kwargs):
            return cls(**{**defaults, **kwargs})

        return build

    return decorate
