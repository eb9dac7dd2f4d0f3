"""Slack approvals: each held call is posted to a channel with Approve / Deny buttons.

When a hold opens, the message shows what will run: tool, agent, session,
rules, and the call's exact canonical arguments (`messages.py`). A click comes
back to `POST /slack/interactions` on the admin port and decides the approval
through the same queue as the REST API (`interactions.py`). When the approval
ends (Slack, REST, timeout), the message is edited to show the outcome and
loses its buttons (`notifier.py`, through `web_api.py`).
"""
