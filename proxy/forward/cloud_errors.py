"""A denial in the cloud API's own error shape, so the SDK raises a readable error.

botocore reads an EC2 Query error from `<Response><Errors><Error>`, other Query
services from `<ErrorResponse><Error>`, JSON-protocol services from `__type` and
`message`, REST-XML (S3) from `<Error>`; Azure's SDKs read `{"error": {"code",
"message"}}` and Google's `{"error": {"code", "message", "status"}}`. The code
is tether's, CamelCased (`TetherRequestDenied`), so it never collides with one
the cloud uses and no SDK retries it; the message names the rule. A message can
quote the request (its path, as mitmproxy decoded it with `surrogateescape`), so
characters XML 1.0 cannot hold, lone surrogates among them, are shown as U+FFFD.
"""

from __future__ import annotations

import json
import re
from xml.sax.saxutils import escape

from ..model import HttpRequest

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def aws_code(code: str) -> str:
    return "Tether" + "".join(part.capitalize() for part in code.replace("-", "_").split("_"))


def cloud_error(cloud: str, service: str | None, request: HttpRequest, status: int, code: str,
                message: str, rid: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a `status` reply to `request` (a cloud API call)."""
    body: dict[str, object]
    if cloud == "azure":
        body = {"error": {"code": aws_code(code), "message": message}}
        return json.dumps(body).encode(), {"content-type": "application/json"}
    if cloud == "gcp":
        body = {"error": {"code": status, "message": message, "status": "PERMISSION_DENIED"}}
        return json.dumps(body).encode(), {"content-type": "application/json"}
    name, text, req_id = aws_code(code), escape(_NOT_XML.sub("\ufffd", message)), escape(rid)
    if request.header("x-amz-target") is not None:
        body = {"__type": name, "message": message}
        return json.dumps(body).encode(), {"content-type": "application/x-amz-json-1.1",
                                           "x-amzn-errortype": name, "x-amzn-requestid": rid}
    error = f"<Code>{name}</Code><Message>{text}</Message>"
    if service == "ec2" or request.host.lower().startswith("ec2."):
        xml = f"<Response><Errors><Error>{error}</Error></Errors><RequestID>{req_id}</RequestID></Response>"
    elif _is_query(request):
        xml = (f"<ErrorResponse><Error><Type>Sender</Type>{error}</Error>"
               f"<RequestId>{req_id}</RequestId></ErrorResponse>")
    else:
        xml = f"<Error>{error}<RequestId>{req_id}</RequestId></Error>"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{xml}').encode(), {
        "content-type": "text/xml", "x-amzn-requestid": rid}


def _is_query(request: HttpRequest) -> bool:
    form = (request.header("content-type") or "").startswith("application/x-www-form-urlencoded")
    return "Action=" in request.query or (form and b"Action=" in request.body)
