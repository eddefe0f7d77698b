"""Built-in tools: ask the user (``create_ask_user_tool``), search the web
(``create_web_search_tool``), and work in a sandbox (``sandbox_tools``)."""

from polos._private.agents.builtins.ask_user import (
    AskUserField,
    AskUserFieldOption,
    AskUserInput,
    create_ask_user_tool,
)
from polos._private.agents.builtins.sandbox import (
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
    docker_status,
    evaluate_allowlist,
    sandbox_tools,
)
from polos._private.agents.builtins.web_search import (
    WebSearchFunction,
    WebSearchOptions,
    WebSearchResult,
    WebSearchResultItem,
    WebSearchToolConfig,
    create_web_search_tool,
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
    "WebSearchFunction",
    "WebSearchOptions",
    "WebSearchResult",
    "WebSearchResultItem",
    "WebSearchToolConfig",
    "create_ask_user_tool",
    "create_web_search_tool",
    "docker_status",
    "evaluate_allowlist",
    "sandbox_tools",
]
