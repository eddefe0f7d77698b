"""Stop conditions: when an agent stops calling the LLM, checked after every agent step.

::

    Agent("researcher", ..., stop_conditions=[max_steps(MaxStepsConfig(count=10)),
                                              executed_tool(ExecutedToolConfig(tool_names=["publish"]))])

    @stop_condition
    def spent_a_dollar(ctx: StopConditionContext) -> bool:
        return sum(s.usage.cost_usd or 0 for s in ctx.steps if s.usage) >= 1.0

A condition is ``(ctx: StopConditionContext[, config]) -> bool`` (sync or async). The first that
returns true ends the run; its name becomes the result's ``stop_reason`` and is recorded in the
run's history (the step ``<agent key>/stopped``). The built-in ones are pure functions of the
recorded steps and are evaluated in place; a custom one runs as a durable step, so a replay
uses its recorded answer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from polos.types import Step


class StopConditionContext(BaseModel):
    """What a stop condition sees: the agent's steps so far, its name and its run."""

    steps: list[Step] = []
    agent_id: str | None = None
    agent_run_id: str | None = None


class MaxTokensConfig(BaseModel):
    limit: int


class MaxStepsConfig(BaseModel):
    count: int = 20


class ExecutedToolConfig(BaseModel):
    tool_names: list[str]


class HasTextConfig(BaseModel):
    texts: list[str]


class StopCondition:
    """A stop condition, configured or not. Calling it with a ``StopConditionContext``
    evaluates it; calling it with a config (a model, a dict or keyword arguments) returns a
    configured copy."""

    def __init__(
        self,
        fn: Callable[..., Any],
        config_type: type[BaseModel] | None,
        config: BaseModel | None = None,
        *,
        pure: bool = False,
    ) -> None:
        self.fn = fn
        self.config_type = config_type
        self.config = config
        self.pure = pure  # a built-in: a pure function of the steps, evaluated without a step
        self.__stop_condition_name__ = getattr(fn, "__name__", "stop_condition")
        self.__stop_condition_fn__ = fn
        self.__stop_condition_config__ = config
        functools.update_wrapper(self, fn)

    @property
    def name(self) -> str:
        return self.__stop_condition_name__

    def __repr__(self) -> str:
        return f"{self.name}({self.config!r})" if self.config is not None else self.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], StopConditionContext):
            return self.evaluate(args[0])
        if self.config_type is None:
            raise TypeError(f"stop condition {self.name!r} takes no configuration")
        if len(args) == 1 and not kwargs and isinstance(args[0], self.config_type):
            config = args[0]
        elif len(args) == 1 and not kwargs and isinstance(args[0], dict):
            config = self.config_type.model_validate(args[0])
        elif not args:
            config = self.config_type(**kwargs)
        else:
            raise TypeError(
                f"{self.name}(...) takes a {self.config_type.__name__}, a dict or keyword "
                f"arguments, got {args!r}"
            )
        return StopCondition(self.fn, self.config_type, config, pure=self.pure)

    def check(self) -> None:
        """Raise when used unconfigured but needs a config (at Agent() time, not mid-run)."""
        if self.config_type is not None and self.config is None:
            try:
                self.config = self.config_type()
                self.__stop_condition_config__ = self.config
            except Exception:
                raise TypeError(
                    f"stop condition {self.name!r} needs a {self.config_type.__name__}: "
                    f"write {self.name}({self.config_type.__name__}(...))"
                ) from None

    def evaluate(self, ctx: StopConditionContext) -> Any:
        if self.config_type is None:
            return self.fn(ctx)
        self.check()
        return self.fn(ctx, self.config)


def stop_condition(fn: Callable[..., Any]) -> StopCondition:
    """Declare a stop condition ``(ctx: StopConditionContext[, config: SomeModel]) -> bool``.

    The parameters are checked here: the first must be the context, an optional second a
    pydantic model class (the configuration)."""
    params = list(inspect.signature(fn).parameters.values())
    if not params or len(params) > 2:
        raise TypeError(
            f"stop condition {getattr(fn, '__qualname__', fn)!r} takes (ctx: StopConditionContext"
            f"[, config]); it has {len(params)} parameters"
        )
    hints: dict[str, Any] = {}
    try:
        import typing

        hints = typing.get_type_hints(fn)
    except Exception:
        hints = dict(getattr(fn, "__annotations__", {}))
    first = hints.get(params[0].name)
    if first is not None and first is not StopConditionContext:
        raise TypeError(
            f"stop condition {fn.__qualname__!r}: its first parameter must be annotated "
            f"StopConditionContext, not {first!r}"
        )
    config_type: type[BaseModel] | None = None
    if len(params) == 2:
        ann = hints.get(params[1].name)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            raise TypeError(
                f"stop condition {fn.__qualname__!r}: its second parameter (the config) must be "
                f"annotated with a pydantic model class, not {ann!r}"
            )
        config_type = ann
    return StopCondition(fn, config_type)


def _builtin(fn: Callable[..., Any]) -> StopCondition:
    cond = stop_condition(fn)
    cond.pure = True
    return cond


@_builtin
def max_steps(ctx: StopConditionContext, config: MaxStepsConfig) -> bool:
    """Stop after ``count`` agent steps (LLM calls). Replaces the agent's default step cap."""
    return len(ctx.steps) >= config.count


@_builtin
def max_tokens(ctx: StopConditionContext, config: MaxTokensConfig) -> bool:
    """Stop once the run's LLM calls used ``limit`` tokens in all."""
    return sum(s.usage.total_tokens for s in ctx.steps if s.usage is not None) >= config.limit


@_builtin
def executed_tool(ctx: StopConditionContext, config: ExecutedToolConfig) -> bool:
    """Stop once every one of ``tool_names`` has been called (an empty list never stops)."""
    if not config.tool_names:
        return False
    called = {c.function.name for s in ctx.steps for c in s.tool_calls}
    return all(name in called for name in config.tool_names)


@_builtin
def has_text(ctx: StopConditionContext, config: HasTextConfig) -> bool:
    """Stop once the model's texts contain every one of ``texts`` (an empty list never stops)."""
    if not config.texts:
        return False
    said = " ".join(str(s.content) for s in ctx.steps if s.content)
    return all(t in said for t in config.texts)


def as_stop_condition(obj: Any, where: str) -> StopCondition:
    """A stop-condition option item as a checked ``StopCondition``; anything else raises."""
    if isinstance(obj, StopCondition):
        obj.check()
        return obj
    if callable(obj):
        return stop_condition(obj)
    raise TypeError(f"{where}: a stop condition must be callable, got {obj!r}")


__all__ = [
    "ExecutedToolConfig",
    "HasTextConfig",
    "MaxStepsConfig",
    "MaxTokensConfig",
    "StopCondition",
    "StopConditionContext",
    "as_stop_condition",
    "executed_tool",
    "has_text",
    "max_steps",
    "max_tokens",
    "stop_condition",
]
