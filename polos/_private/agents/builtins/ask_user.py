"""``create_ask_user_tool()``: the agent asks a human and the run waits for the answer.

The question is a ``ctx.step.suspend`` in the tool call's scope (key ``ask_user``), with the
``_form`` convention the UI's approval page renders (docs/ui.md): the run holds no worker until
the answer comes through ``polos resume``, ``client.resume`` or the page, and the tool returns
the answer (the resume's data) to the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from polos._private.agents.tools import Tool

if TYPE_CHECKING:
    from polos.workflow import WorkflowContext

ASK_USER_DESCRIPTION = (
    "Ask the user a question and wait for their response. Use this when you need "
    "clarification, a decision, or any input from the user. You can define structured fields "
    "(text, select, boolean, etc.) for specific response formats, or omit fields for a "
    "free-text response."
)


class AskUserFieldOption(BaseModel):
    """One choice of a ``select`` field."""

    label: str
    value: str


class AskUserField(BaseModel):
    """One field of the answer form; the answer holds its value under ``key``."""

    key: str = Field(description="The answer's key for this field")
    type: Literal["text", "textarea", "number", "boolean", "select"] = "text"
    label: str = Field(description="What the user sees")
    description: str | None = None
    required: bool | None = None
    options: list[AskUserFieldOption] | None = Field(
        default=None, description="The choices of a select field"
    )


class AskUserInput(BaseModel):
    """What the model asks: a question, an optional title, optional structured fields."""

    question: str = Field(description="The question to ask the user")
    title: str | None = Field(default=None, description="A short title for the question")
    fields: list[AskUserField] | None = Field(
        default=None,
        description="Structured fields for the answer; omit for a free-text response",
    )


def create_ask_user_tool(*, id: str = "ask_user", description: str | None = None) -> Tool:
    """A tool the agent calls to ask the user something; the run waits for the answer."""

    async def ask_user(ctx: WorkflowContext, input: AskUserInput) -> Any:
        if input.fields:
            fields = [f.model_dump(exclude_none=True) for f in input.fields]
        else:
            fields = [
                {"key": "response", "type": "textarea", "label": input.question, "required": True}
            ]
        answer = await ctx.step.suspend(
            "ask_user",
            {
                "_form": {
                    "title": input.title or "Agent Question",
                    "description": input.question,
                    "fields": fields,
                },
                "_source": "ask_user",
                "_tool": id,
            },
        )
        return answer.data

    return Tool.from_function(ask_user, id=id, description=description or ASK_USER_DESCRIPTION)


__all__ = ["AskUserField", "AskUserFieldOption", "AskUserInput", "create_ask_user_tool"]
