"""Looking through the wrappers Ray puts around an exception that stopped a pipeline."""

from collections.abc import Iterator


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it (causes, contexts, and the `cause` Ray's errors keep), each once."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        stack += [error.__cause__, error.__context__, getattr(error, "cause", None)]
