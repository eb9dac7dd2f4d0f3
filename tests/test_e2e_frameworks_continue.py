"""Agent frameworks, unchanged, through tether with its default `on_deny: continue`.

LangGraph (the prebuilt ReAct agent on langchain-openai) and pydantic-ai run the loop the
issue measured: run the calls the model asked for, send the results back, stop at an answer
without a call. The model's script (test_e2e_continuations.SCRIPT): delete (denied), then,
having read why, list (allowed), then a final answer. Each test shows the denial reached
the model (tether's continuation request holds the denied call and its result naming the
rule), the framework ran the allowed call, never the denied one, and its own history holds
one ordinary answer where the model's first two rounds were. The fake upstream refuses a
result without its call (fake_history), as the real API does. The OpenAI Agents SDK is in
test_e2e_continuations; the Vercel AI SDK in test_e2e_ai_sdk.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack
from tests.test_e2e_continuations import DENIAL, DONE, SCRIPT, check_continuation

pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning")


# --- LangGraph -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_langgraph(stack: Stack, api: str, stream: bool) -> None:
    """LangGraph's own agent graph (a model node, its ToolNode, `tools_condition`): the graph
    ends when the model's message has no tool call."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    listed: list[str] = []

    @tool
    def list_volumes() -> str:
        """List the volumes."""
        listed.append("yes")
        return "[vol-9 (production)]"

    @tool
    def delete_volume(volume_id: str, tags: dict[str, str]) -> str:
        """Delete a volume."""
        raise AssertionError("a denied call must never run")

    stack.fake.push(*SCRIPT)
    model = ChatOpenAI(model="gpt-x", base_url=stack.base_url, api_key="sk-agent",  # type: ignore[arg-type]
                       max_retries=0, use_responses_api=api == "responses")
    bound = model.bind_tools([list_volumes, delete_volume])

    async def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode([list_volumes, delete_volume]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    agent = graph.compile()
    question: MessagesState = {"messages": [HumanMessage("clean up the volumes")]}
    if stream:
        # Token by token (the model is called with stream=True), and the graph's states.
        streamed: list[str] = []
        messages: list[Any] = []
        part: Any
        async for part in agent.astream(question, stream_mode=["messages", "values"]):
            mode, data = part
            if mode == "messages" and isinstance(data[0], AIMessage):
                streamed.append(data[0].text)
            elif mode == "values":
                messages = data["messages"]
        assert DENIAL in "".join(streamed) and DONE in "".join(streamed)
        assert all(r.get("stream") for r in stack.fake.requests)
    else:
        messages = (await agent.ainvoke(question))["messages"]
    answers = [m for m in messages if isinstance(m, AIMessage)]
    assert len(answers) == 2                       # one answer where the model took two rounds
    assert DENIAL in answers[0].text and answers[0].text.startswith("Cleaning up.")
    assert [c["name"] for c in answers[0].tool_calls] == ["list_volumes"]
    assert [m.name for m in messages if isinstance(m, ToolMessage)] == ["list_volumes"]
    assert answers[1].text == DONE
    assert listed == ["yes"]
    check_continuation(stack, api)


# --- pydantic-ai -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_pydantic_ai(stack: Stack, api: str, stream: bool) -> None:
    from openai import AsyncOpenAI
    from pydantic_ai import Agent, AgentRunResultEvent
    from pydantic_ai.messages import (
        ModelResponse,
        PartDeltaEvent,
        PartStartEvent,
        TextPart,
        TextPartDelta,
        ToolCallPart,
    )
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    listed: list[str] = []
    client = AsyncOpenAI(base_url=stack.base_url, api_key="sk-agent", max_retries=0)
    provider = OpenAIProvider(openai_client=client)
    model = OpenAIChatModel("gpt-x", provider=provider) if api == "chat" \
        else OpenAIResponsesModel("gpt-x", provider=provider)
    agent = Agent(model, instructions="Clean up the volumes.")

    @agent.tool_plain
    def list_volumes() -> str:
        """List the volumes."""
        listed.append("yes")
        return "[vol-9 (production)]"

    @agent.tool_plain
    def delete_volume(volume_id: str, tags: dict[str, str]) -> str:
        """Delete a volume."""
        raise AssertionError("a denied call must never run")

    stack.fake.push(*SCRIPT)
    try:
        if stream:
            # run_stream_events: the whole run, streamed (run_stream ends at the first text,
            # before a tool call in the same answer, with or without tether).
            deltas: list[str] = []
            async with agent.run_stream_events("clean up the volumes") as events:
                async for event in events:
                    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                        deltas.append(event.part.content)
                    elif isinstance(event, PartDeltaEvent) \
                            and isinstance(event.delta, TextPartDelta):
                        deltas.append(event.delta.content_delta)
                    elif isinstance(event, AgentRunResultEvent):
                        output, history = event.result.output, event.result.all_messages()
            assert DENIAL in "".join(deltas)       # streamed to the agent as it came
            assert all(r.get("stream") for r in stack.fake.requests)
        else:
            result = await agent.run("clean up the volumes")
            output, history = result.output, result.all_messages()
    finally:
        await client.close()
    assert output == DONE
    answers = [m for m in history if isinstance(m, ModelResponse)]
    assert len(answers) == 2                       # one answer where the model took two rounds
    first_text = "".join(p.content for p in answers[0].parts if isinstance(p, TextPart))
    assert DENIAL in first_text and first_text.startswith("Cleaning up.")
    assert [p.tool_name for p in answers[0].parts if isinstance(p, ToolCallPart)] \
        == ["list_volumes"]
    assert listed == ["yes"]
    check_continuation(stack, api)
