"""``create_web_search_tool()``: web search for agents, Tavily's HTTP API by default.

The search is the durable step ``web_search`` inside the tool call, so a replay returns the
recorded results and never searches (or pays) twice. ``base_url`` points it at any server that
speaks Tavily's ``POST /search``; ``search=`` replaces Tavily with your own function.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from polos._private.agents.tools import Tool, ToolApproval
from polos._private.model.values import NO_RETRY

if TYPE_CHECKING:
    from polos.workflow import WorkflowContext

Topic = Literal["general", "news"]


class WebSearchOptions(BaseModel):
    max_results: int
    topic: Topic = "general"


class WebSearchResultItem(BaseModel):
    title: str
    url: str
    content: str
    score: float | None = None
    published_date: str | None = None


class WebSearchResult(BaseModel):
    query: str
    results: list[WebSearchResultItem]
    answer: str | None = None


WebSearchFunction = Callable[[str, WebSearchOptions], Awaitable[WebSearchResult]]


@dataclass
class TavilySearchConfig:
    """Tavily's settings. ``api_key`` falls back to ``TAVILY_API_KEY``, read at call time."""

    api_key: str | None = None
    search_depth: Literal["basic", "advanced"] = "basic"
    include_answer: bool = True
    include_raw_content: bool = False
    base_url: str = "https://api.tavily.com"
    timeout: float = 30.0


@dataclass
class WebSearchToolConfig(TavilySearchConfig):
    search: WebSearchFunction | None = None
    max_results: int = 5
    topic: Topic = "general"
    tool_id: str = "web_search"
    approval: ToolApproval | None = None


class WebSearchInput(BaseModel):
    """What the model gives the search."""

    model_config = ConfigDict(populate_by_name=True)

    query: str = Field(description="The search query")
    max_results: int | None = Field(
        default=None, alias="maxResults", ge=1, le=20, description="How many results (1-20)"
    )
    topic: Topic | None = Field(default=None, description="general or news")


def _post(url: str, body: dict[str, Any], key: str, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(
            req, timeout=timeout
        ) as resp:  # base_url is checked: http(s) only
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


async def tavily_search(
    query: str, options: WebSearchOptions, config: TavilySearchConfig
) -> WebSearchResult:
    """One Tavily search (``POST {base_url}/search``)."""
    key = config.api_key or os.environ.get("TAVILY_API_KEY")
    if not key:
        raise ValueError(
            "web_search needs a Tavily API key: set TAVILY_API_KEY or "
            "WebSearchToolConfig(api_key=...)"
        )
    if not config.base_url.startswith(("http://", "https://")):
        raise ValueError(f"web_search: base_url must be http(s)://..., got {config.base_url!r}")
    body = {
        "query": query,
        "max_results": options.max_results,
        "search_depth": config.search_depth,
        "include_answer": config.include_answer,
        "include_raw_content": config.include_raw_content,
        "topic": options.topic,
    }
    status, raw = await asyncio.to_thread(
        _post, f"{config.base_url.rstrip('/')}/search", body, key, config.timeout
    )
    if status != 200:
        try:
            parsed = orjson.loads(raw)
            detail = parsed.get("detail") or parsed.get("error") or parsed
        except (orjson.JSONDecodeError, AttributeError):
            detail = raw.decode(errors="replace")[:500]
        raise RuntimeError(f"Tavily API error ({status}): {detail}")
    data = orjson.loads(raw)
    return WebSearchResult(
        query=str(data.get("query") or query),
        answer=data.get("answer"),
        results=[
            WebSearchResultItem(
                title=str(r.get("title") or ""),
                url=str(r.get("url") or ""),
                content=str(r.get("content") or ""),
                score=r.get("score"),
                published_date=r.get("published_date") or r.get("publishedDate"),
            )
            for r in data.get("results") or []
        ],
    )


def create_web_search_tool(config: WebSearchToolConfig | None = None) -> Tool:
    """A ``web_search`` tool: ``{query, maxResults?, topic?}`` in, ``{query, answer, results:
    [{title, url, content, score, publishedDate}]}`` out."""
    cfg = config or WebSearchToolConfig()

    async def web_search(ctx: WorkflowContext, input: WebSearchInput) -> dict[str, Any]:
        options = WebSearchOptions(
            max_results=input.max_results or cfg.max_results, topic=input.topic or cfg.topic
        )

        async def search() -> dict[str, Any]:
            if cfg.search is not None:
                found = await cfg.search(input.query, options)
            else:
                found = await tavily_search(input.query, options, cfg)
            return {
                "query": found.query,
                "answer": found.answer,
                "results": [
                    {
                        "title": r.title,
                        "url": r.url,
                        "content": r.content,
                        "score": r.score,
                        "publishedDate": r.published_date,
                    }
                    for r in found.results
                ],
            }

        # A failed search goes back to the model as the tool's error (no blind retries of a
        # paid call: a bad key or a 4xx would fail again).
        return await ctx.step.run("web_search", search, retry=NO_RETRY)

    return Tool.from_function(
        web_search,
        id=cfg.tool_id,
        description=(
            "Search the web for current information. Returns relevant results with titles, "
            "URLs, and content snippets."
        ),
        approval=cfg.approval,
    )


__all__ = [
    "TavilySearchConfig",
    "WebSearchFunction",
    "WebSearchInput",
    "WebSearchOptions",
    "WebSearchResult",
    "WebSearchResultItem",
    "WebSearchToolConfig",
    "create_web_search_tool",
    "tavily_search",
]
