"""Tools an agent can call, and the built-in ones.

A tool is a workflow-style function, ``async def f(ctx: WorkflowContext, input: Model) -> Out``
(the model sees ``Model``'s JSON schema; ``ctx.step`` works inside), or a plain sync or async
function described by its type hints and docstring::

    @tool(description="Current weather of a city")
    async def get_weather(ctx: WorkflowContext, input: WeatherInput) -> WeatherOutput: ...

    @tool(approval="always")            # a human approves each call (the run waits, no worker)
    def refund(order_id: str, amount: float) -> str: ...

Built-ins: ``create_ask_user_tool()`` (the agent asks a human, the run waits for the answer),
``create_web_search_tool(WebSearchToolConfig(...))`` (Tavily), ``sandbox_tools(
SandboxToolsConfig(...))`` (exec, read, write, edit, glob, grep in a workspace). See
docs/agents.md, "Tools".
"""

from __future__ import annotations

from polos._private.agents.builtins import (
    AskUserField,
    AskUserFieldOption,
    AskUserInput,
    DockerEnvironment,
    DockerEnvironmentConfig,
    E2BEnvironmentConfig,
    ExecResult,
    ExecToolConfig,
    ExecutionEnvironment,
    LocalEnvironment,
    LocalEnvironmentConfig,
    SandboxToolsConfig,
    SandboxUnavailableError,
    WebSearchFunction,
    WebSearchOptions,
    WebSearchResult,
    WebSearchResultItem,
    WebSearchToolConfig,
    create_ask_user_tool,
    create_web_search_tool,
    docker_status,
    evaluate_allowlist,
    sandbox_tools,
)
from polos._private.agents.tools import (
    Tool,
    ToolApproval,
    ToolRejectedError,
    ToolScope,
    as_tool,
    current_tool_scope,
    tool,
)

__all__ = [
    "AskUserField",
    "AskUserFieldOption",
    "AskUserInput",
    "DockerEnvironment",
    "DockerEnvironmentConfig",
    "E2BEnvironmentConfig",
    "ExecResult",
    "ExecToolConfig",
    "ExecutionEnvironment",
    "LocalEnvironment",
    "LocalEnvironmentConfig",
    "SandboxToolsConfig",
    "SandboxUnavailableError",
    "Tool",
    "ToolApproval",
    "ToolRejectedError",
    "ToolScope",
    "WebSearchFunction",
    "WebSearchOptions",
    "WebSearchResult",
    "WebSearchResultItem",
    "WebSearchToolConfig",
    "as_tool",
    "create_ask_user_tool",
    "create_web_search_tool",
    "current_tool_scope",
    "docker_status",
    "evaluate_allowlist",
    "sandbox_tools",
    "tool",
]
