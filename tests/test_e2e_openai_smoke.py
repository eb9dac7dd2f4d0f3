from tests.conftest import Stack
from tests.fakes import Call, Reply

TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_volume", "drop_database")
]


async def test_smoke(stack: Stack) -> None:
    stack.fake.push(Reply(calls=(Call("get_weather", '{"city": "Paris"}'),
                                 Call("delete_volume", '{"tags": {"env": "production"}}'))))
    client = stack.client()
    r = await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    print(r)
    stack.fake.push(Reply(content="Sure.", calls=(Call("get_weather", '{"city": "Paris"}'),
                                 Call("delete_volume", '{"tags": {"env": "production"}}'))))
    s = await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, stream=True)
    async for chunk in s:
        print(chunk.choices[0].delta if chunk.choices else chunk)
    print(stack.audit())
