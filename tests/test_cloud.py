"""The cloud classifier: hosts, the AWS Query/JSON/REST protocols, Azure ARM, GCP REST,
the catalog's effects and overrides, and the bypasses each one must refuse.

Real AWS requests come from boto3 clients whose `before-send` hook captures the
signed request and stops it: nothing leaves the machine.
"""

from __future__ import annotations

import datetime
import gzip
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import botocore.config
import botocore.session
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ConfigError
from proxy.model import Effect, HttpRequest
from proxy.policy.cloud import (
    CloudHost,
    CloudOperation,
    Refused,
    Unclassified,
    builtin_catalog,
    classify,
    cloud_host,
    load_catalog,
)
from proxy.policy.cloud_aws import unflatten
from proxy.policy.cloud_catalog import verb_of

FORM = ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
ARM = "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.Compute/disks/disk1"
BK = {"Bucket": "bkt", "Key": "k"}


def req(host: str, method: str = "POST", path: str = "/", query: str = "",
        headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> HttpRequest:
    return HttpRequest(method, "https", host, 443, path, query, headers, body)


def ec2(body: str = "", query: str = "", headers: tuple[tuple[str, str], ...] = (FORM,),
        host: str = "ec2.us-east-1.amazonaws.com") -> HttpRequest:
    return req(host, "POST", "/", query, headers, body.encode())


def op(result: object) -> CloudOperation:
    assert isinstance(result, CloudOperation), result
    return result


def refused(result: object, *words: str) -> None:
    assert isinstance(result, Refused), result
    for word in words:
        assert word.lower() in result.reason.lower(), result.reason


# ---------------------------------------------------------------- hosts

HOSTS = [
    # (host, cloud, service, region, bucket)
    ("ec2.us-east-1.amazonaws.com", "aws", "ec2", "us-east-1", None),
    ("EC2.US-EAST-1.AMAZONAWS.COM.", "aws", "ec2", "us-east-1", None),
    ("ec2.amazonaws.com", "aws", "ec2", None, None),
    ("iam.amazonaws.com", "aws", "iam", None, None),
    ("us-west-1.ec2.amazonaws.com", "aws", "ec2", "us-west-1", None),
    ("ec2-fips.us-gov-west-1.amazonaws.com", "aws", "ec2", "us-gov-west-1", None),
    ("ec2.cn-north-1.amazonaws.com.cn", "aws", "ec2", "cn-north-1", None),
    ("dynamodb.us-east-1.api.aws", "aws", "dynamodb", "us-east-1", None),
    ("monitoring.eu-west-1.amazonaws.com", "aws", "cloudwatch", "eu-west-1", None),
    ("queue.amazonaws.com", "aws", "sqs", None, None),
    ("api.ecr.us-east-1.amazonaws.com", "aws", "ecr", "us-east-1", None),
    ("vpce-0a1b2c-d3e4f5.ec2.us-east-1.vpce.amazonaws.com", "aws", "ec2", "us-east-1", None),
    ("es.us-east-1.amazonaws.com", "aws", "es", "us-east-1", None),
    ("s3.amazonaws.com", "aws", "s3", None, None),
    ("s3.us-west-2.amazonaws.com", "aws", "s3", "us-west-2", None),
    ("bucket.s3.us-west-2.amazonaws.com", "aws", "s3", "us-west-2", "bucket"),
    ("bucket.s3.amazonaws.com", "aws", "s3", None, "bucket"),
    ("my.dotted.bucket.s3.dualstack.eu-west-1.amazonaws.com", "aws", "s3", "eu-west-1", "my.dotted.bucket"),
    ("bucket.s3-us-west-2.amazonaws.com", "aws", "s3", "us-west-2", "bucket"),
    ("s3-external-1.amazonaws.com", "aws", "s3", "us-east-1", None),
    ("s3-fips.dualstack.us-east-1.amazonaws.com", "aws", "s3", "us-east-1", None),
    ("bucket.s3-accelerate.dualstack.amazonaws.com", "aws", "s3", None, "bucket"),
    ("bucket.vpce-0abc-123.s3.us-east-1.vpce.amazonaws.com", "aws", "s3", "us-east-1", "bucket"),
    ("ap-111122223333.s3-accesspoint.us-west-2.amazonaws.com", "aws", "s3", "us-west-2", "ap-111122223333"),
    ("management.azure.com", "azure", None, None, None),
    ("Management.Azure.Com.", "azure", None, None, None),
    ("compute.googleapis.com", "gcp", "compute", None, None),
    ("compute.mtls.googleapis.com", "gcp", "compute", None, None),
    ("us-central1-aiplatform.googleapis.com", "gcp", "aiplatform", "us-central1", None),
    ("www.googleapis.com", "gcp", None, None, None),
]


@pytest.mark.parametrize(("host", "cloud", "service", "region", "bucket"), HOSTS)
def test_cloud_hosts(host: str, cloud: str, service: str | None, region: str | None,
                     bucket: str | None) -> None:
    assert cloud_host(host) == CloudHost(cloud, service, region, bucket)


NOT_CLOUD = [
    "amazonaws.com.evil.net", "evilamazonaws.com", "ec2.us-east-1.amazonaws.com.evil.net",
    "ec2.us-east-1.amazonaws.comx", "amazonaws.com", "api.aws", "x.amazonaws.co",
    "googleapis.com", "compute.googleapis.com.evil.net", "evilgoogleapis.com",
    "management.azure.com.evil.net", "xmanagement.azure.com", "evil.management.azure.com",
    "1.2.3.4", "169.254.169.254", "::1", "[::1]", "[2600:1f18::1]", "",
    "ec2.us-east-1.amazonaws.com:443", "ec2 .us-east-1.amazonaws.com", "ec2..amazonaws.com",
    "ec2_x.us-east-1.amazonaws.com", "ec2.us-east-1.amazonaws.com..",
    # customers' own endpoints under a cloud domain
    "my-lb-1234.us-east-1.elb.amazonaws.com", "ec2-1-2-3-4.compute-1.amazonaws.com",
    "ec2-1-2-3-4.us-west-2.compute.amazonaws.com", "abc123.execute-api.us-east-1.amazonaws.com",
    "bucket.s3-website-us-east-1.amazonaws.com", "bucket.s3-website.eu-west-1.amazonaws.com",
    "search-logs-abc.us-east-1.es.amazonaws.com",
]


@pytest.mark.parametrize("host", NOT_CLOUD)
def test_not_cloud_hosts(host: str) -> None:
    assert cloud_host(host) is None
    assert classify(ec2("Action=DeleteVolume&VolumeId=vol-1", host=host)) is None


@pytest.mark.parametrize("host", ["ｅｃ２.us-east-1.amazonaws.com", "ec2.us-east-1.amazonaws.ｃｏｍ",
                                  "ｍａｎａｇｅｍｅｎｔ.azure.com", "compute.googleapis.com\u3002"])
def test_unicode_look_alike_hosts_are_refused(host: str) -> None:
    refused(classify(ec2("Action=DeleteVolume&VolumeId=vol-1", host=host)), "look-alike")


@pytest.mark.parametrize("host", ["evil.ec2.us-east-1.amazonaws.com", "bucket.storage.googleapis.com",
                                  "a.b.compute.googleapis.com"])
def test_unknown_forms_of_cloud_hosts_are_unclassified(host: str) -> None:
    result = classify(ec2("Action=DeleteVolume&VolumeId=vol-1", host=host))
    assert isinstance(result, Unclassified), result


_LABEL = st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True)


SUFFIXES = ["amazonaws.com", "amazonaws.com.cn", "api.aws", "googleapis.com", "management.azure.com"]


def _ends_with_cloud_domain(host: str) -> bool:
    labels = host.split(".")
    return any(labels[-len(s.split(".")):] == s.split(".") for s in SUFFIXES)


@settings(max_examples=300)
@given(st.lists(_LABEL, min_size=0, max_size=3), st.sampled_from(SUFFIXES), _LABEL,
       st.lists(_LABEL, min_size=1, max_size=2))
def test_cloud_suffixes_are_anchored(prefix: list[str], suffix: str, glued: str, after: list[str]) -> None:
    """A cloud domain glued to a label, or followed by more labels, is never that cloud."""
    assert cloud_host(".".join([*prefix, glued + suffix])) is None
    trailing = ".".join([*prefix, suffix, *after])
    assert cloud_host(trailing) is None or _ends_with_cloud_domain(trailing)


# ---------------------------------------------------------------- AWS Query protocol

QUERY_OK = [
    # (query, body, operation, arguments)
    ("", "Action=DeleteVolume&Version=2016-11-15&VolumeId=vol-1", "DeleteVolume",
     {"Version": "2016-11-15", "VolumeId": "vol-1"}),
    ("Action=DeleteVolume&VolumeId=vol-1", "", "DeleteVolume", {"VolumeId": "vol-1"}),
    ("Action=DeleteVolume", "VolumeId=vol-1", "DeleteVolume", {"VolumeId": "vol-1"}),
    ("Action=DeleteVolume", "Action=DeleteVolume&VolumeId=vol-1", "DeleteVolume", {"VolumeId": "vol-1"}),
    ("", "Action=DescribeVolumes&VolumeId.1=a&VolumeId.2=b", "DescribeVolumes", {"VolumeId": ["a", "b"]}),
    ("", "Action=DescribeVolumes&Filter.1.Name=tag%3Aenv&Filter.1.Value.1=prod&Filter.1.Value.2=dev"
     "&Filter.2.Name=size&Filter.2.Value.1=8", "DescribeVolumes",
     {"Filter": [{"Name": "tag:env", "Value": ["prod", "dev"]}, {"Name": "size", "Value": ["8"]}]}),
    ("", "Action=CreateUser&Tags.member.1.Key=env&Tags.member.1.Value=prod", "CreateUser",
     {"Tags": [{"Key": "env", "Value": "prod"}]}),
    ("", "Action=SetAttributes&Attributes.entry.1.key=a&Attributes.entry.1.value=1", "SetAttributes",
     {"Attributes": {"a": "1"}}),
    ("", "Action=SetQueueAttributes&Attribute.1.Name=Policy&Attribute.1.Value=x", "SetQueueAttributes",
     {"Attribute": [{"Name": "Policy", "Value": "x"}]}),
    ("", "Action=DescribeVolumes&VolumeId=", "DescribeVolumes", {"VolumeId": ""}),
    ("", "Action=Describe+Volumes2", None, None),  # '+' is a space: refused below
    ("X-Amz-Signature=abc&X-Amz-Security-Token=tok&Action=DeleteVolume&VolumeId=v", "", "DeleteVolume",
     {"VolumeId": "v"}),
    ("", "Action=DeleteVolume&VolumeId=a&VolumeId=a", "DeleteVolume", {"VolumeId": "a"}),
    ("", "&&Action=DeleteVolume&&VolumeId=a&", "DeleteVolume", {"VolumeId": "a"}),
]


@pytest.mark.parametrize(("query", "body", "operation", "arguments"),
                         [row for row in QUERY_OK if row[2] is not None])
def test_query_protocol(query: str, body: str, operation: str, arguments: dict[str, object]) -> None:
    result = op(classify(ec2(body, query)))
    assert (result.cloud, result.service, result.operation) == ("aws", "ec2", operation)
    assert result.api == f"aws.ec2.{operation}"
    assert result.arguments == arguments


QUERY_REFUSED = [
    # (query, body, headers, words in the reason)
    ("Action=DescribeVolumes", "Action=DeleteVolume&VolumeId=v", (FORM,), ("twice",)),
    ("", "Action=DescribeVolumes&Action=DeleteVolume", (FORM,), ("twice",)),
    ("", "Action=DescribeVolumes&action=DeleteVolume", (FORM,), ("also given",)),
    ("action=DeleteVolume", "Action=DescribeVolumes", (FORM,), ("also given",)),
    ("", "Action=DeleteVolume&VolumeId=a&VolumeId=b", (FORM,), ("twice",)),
    ("VolumeId.1=a", "Action=DeleteVolume&VolumeId.1=b", (FORM,), ("twice",)),
    ("", "Action=DescribeVolumes&VolumeId.2=b", (FORM,), ("1..n",)),
    ("", "Action=DescribeVolumes&VolumeId.01=b", (FORM,), ("1..n",)),
    ("", "Action=DescribeVolumes&VolumeId.1=a&VolumeId.3=b", (FORM,), ("1..n",)),
    ("", "Action=DescribeVolumes&Filter=x&Filter.1.Name=y", (FORM,), ("both a value and a structure",)),
    ("", "Action=DescribeVolumes&Filter.1.Name=y&Filter=x", (FORM,), ("both a value and a structure",)),
    ("", "Action=DescribeVolumes&X.1=a&X.b=c", (FORM,), ("mixes",)),
    ("", "Action=DescribeVolumes&A..B=c", (FORM,), ("empty name part",)),
    ("", "Action=DeleteVolume;VolumeId=v", (FORM,), ("';'",)),
    ("", "Action=DeleteVolume&VolumeId=%zz", (FORM,), ("percent",)),
    ("", "Action=DeleteVolume&VolumeId=%ff", (FORM,), ("utf-8",)),
    ("", "Action=deleteVolume", (FORM,), ("not an aws operation",)),
    ("", "Action=Delete+Volume", (FORM,), ("not an aws operation",)),
    ("", "Action=Delete%E2%80%8BVolume", (FORM,), ("not an aws operation",)),
    ("", "=x&Action=DeleteVolume", (FORM,), ("without a name",)),
    ("Action=DescribeVolumes", '{"Action": "DeleteVolume"}', (("Content-Type", "application/json"),),
     ("neither a form",)),
    ("Action=DescribeVolumes", "Action=DeleteVolume", (("Content-Type", "multipart/form-data"),),
     ("neither a form",)),
    ("", "Action=DeleteVolume", (FORM, ("Content-Type", "text/plain")), ("content-type",)),
    ("", "Action=DeleteVolume", (FORM, ("Content_Type", "text/plain")), ("look-alike",)),
]


@pytest.mark.parametrize(("query", "body", "headers", "words"), QUERY_REFUSED)
def test_query_protocol_ambiguities_are_refused(query: str, body: str, headers: tuple[tuple[str, str], ...],
                                                words: tuple[str, ...]) -> None:
    refused(classify(ec2(body, query, headers)), *words)


def test_query_body_without_content_type_is_read_as_a_form() -> None:
    """A server may parse an untyped body as a form: tether reads it, so conflicts show."""
    refused(classify(ec2("Action=DeleteVolume", "Action=DescribeVolumes", headers=())), "twice")


def test_query_without_action_is_unclassified() -> None:
    result = classify(ec2("VolumeId=vol-1"))
    assert isinstance(result, Unclassified) and result.service == "ec2"
    rest = classify(req("apigateway.us-east-1.amazonaws.com", "DELETE", "/restapis/abc"))
    assert isinstance(rest, Unclassified) and rest.service == "apigateway" and "X-Amz-Target" in rest.reason


def test_gzip_body_is_read_and_checked() -> None:
    gz = ("Content-Encoding", "gzip")
    body = gzip.compress(b"Action=DeleteVolume&VolumeId=vol-1")
    result = op(classify(req("ec2.us-east-1.amazonaws.com", body=body, headers=(FORM, gz))))
    assert result.operation == "DeleteVolume" and result.arguments == {"VolumeId": "vol-1"}
    refused(classify(req("ec2.us-east-1.amazonaws.com", query="Action=DescribeVolumes", body=body,
                         headers=(FORM, gz))), "twice")
    refused(classify(req("ec2.us-east-1.amazonaws.com", body=body[:-4], headers=(FORM, gz))), "gzip")
    br = ("Content-Encoding", "br")
    refused(classify(req("ec2.us-east-1.amazonaws.com", body=body, headers=(FORM, br))),
            "content-encoding")
    bomb = gzip.compress(b"Action=DeleteVolume&A=" + b"a" * (17 * 1024 * 1024))
    refused(classify(req("ec2.us-east-1.amazonaws.com", body=bomb, headers=(FORM, gz))), "too large")


# ---------------------------------------------------------------- AWS JSON protocol

DDB = "dynamodb.us-east-1.amazonaws.com"
JSON_CT = ("Content-Type", "application/x-amz-json-1.0")


@pytest.mark.parametrize("headers", [
    (("X-Amz-Target", "DynamoDB_20120810.DeleteTable"), JSON_CT),
    (("x-amz-target", "DynamoDB_20120810.DeleteTable"), JSON_CT),
    (("X-AMZ-TARGET", "  DynamoDB_20120810.DeleteTable \t"), JSON_CT),
    (("X-Amz-Target", "DynamoDB_20120810.DeleteTable"), ("x-amz-target", "DynamoDB_20120810.DeleteTable")),
])
def test_json_protocol(headers: tuple[tuple[str, str], ...]) -> None:
    result = op(classify(req(DDB, headers=headers, body=b'{"TableName": "prod-orders"}')))
    assert result.api == "aws.dynamodb.DeleteTable" and result.effect is Effect.WRITE
    assert result.arguments == {"TableName": "prod-orders"}


JSON_REFUSED = [
    # (extra headers, query, body, words)
    ((("X-Amz-Target", "DynamoDB_20120810. DeleteTable"),), "", b"{}", ("prefix.operation",)),
    ((("X-Amz-Target", "DynamoDB_20120810.Delete Table"),), "", b"{}", ("prefix.operation",)),
    ((("X-Amz-Target", "DeleteTable"),), "", b"{}", ("prefix.operation",)),
    ((("X-Amz-Target", "DynamoDB_20120810.ListTables, DynamoDB_20120810.DeleteTable"),), "", b"{}",
     ("prefix.operation",)),
    ((("X-Amz-Target", "DynamoDB_20120810.ListTables"), ("X-Amz-Target", "DynamoDB_20120810.DeleteTable")),
     "", b"{}", ("different values",)),
    ((("X-Amz-Target", "DynamoDB_20120810.deleteTable"),), "", b"{}", ("not an aws operation",)),
    ((("X_Amz_Target", "DynamoDB_20120810.DeleteTable"),), "", b"{}", ("look-alike",)),
    ((("X-Amz-Target ", "DynamoDB_20120810.DeleteTable"),), "", b"{}", ("look-alike",)),
    ((("X-Amz-Target", "DynamoDB_20120810.ListTables"),), "Action=DeleteTable", b"{}", ("twice",)),
    ((("X-Amz-Target", "DynamoDB_20120810.ListTables"), FORM), "", b"Action=DeleteTable", ("form body",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", b'{"TableName": "a", "TableName": "b"}',
     ("duplicate key",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", b'["TableName"]', ("json object",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", b'{"Limit": NaN}', ("not valid json",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", '{"TableName": "a"}'.encode("utf-16"),
     ("not valid json",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", b"\xef\xbb\xbf{}", ("not valid json",)),
    ((("X-Amz-Target", "DynamoDB_20120810.DeleteTable"),), "", b'{"a":' * 100000, ("nested too deeply",)),
]


@pytest.mark.parametrize(("headers", "query", "body", "words"), JSON_REFUSED)
def test_json_protocol_spoofing_is_refused(headers: tuple[tuple[str, str], ...], query: str, body: bytes,
                                           words: tuple[str, ...]) -> None:
    refused(classify(req(DDB, query=query, headers=(*headers, JSON_CT) if FORM not in headers else headers,
                         body=body)), *words)


def test_json_protocol_empty_body_and_rpc_v2_cbor() -> None:
    assert op(classify(req(DDB, headers=(("X-Amz-Target", "DynamoDB_20120810.ListTables"),)))).arguments == {}
    cbor = classify(req("monitoring.us-east-1.amazonaws.com", path="/service/Granite/operation/DeleteAlarms",
                        headers=(("smithy-protocol", "rpc-v2-cbor"),), body=b"\xa0"))
    assert isinstance(cbor, Unclassified) and "CBOR" in cbor.reason


# ---------------------------------------------------------------- AWS REST (S3)

S3_CASES = [
    # (host, method, path, query, headers, operation, arguments)
    ("s3.amazonaws.com", "GET", "/", "", (), "ListBuckets", {}),
    ("s3.us-west-2.amazonaws.com", "GET", "/bkt", "list-type=2&prefix=logs%2F", (), "ListObjectsV2",
     {"Bucket": "bkt", "prefix": "logs/"}),
    ("s3.us-west-2.amazonaws.com", "GET", "/bkt/", "", (), "ListObjects", {"Bucket": "bkt"}),
    ("bkt.s3.us-west-2.amazonaws.com", "GET", "/", "list-type=2", (), "ListObjectsV2", {"Bucket": "bkt"}),
    ("bkt.s3.us-west-2.amazonaws.com", "DELETE", "/", "", (), "DeleteBucket", {"Bucket": "bkt"}),
    ("s3.amazonaws.com", "DELETE", "/bkt", "", (), "DeleteBucket", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "PUT", "/", "policy", (), "PutBucketPolicy", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "PUT", "/", "policy=", (), "PutBucketPolicy", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "GET", "/", "acl", (), "GetBucketAcl", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "PUT", "/", "", (), "CreateBucket", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "HEAD", "/", "", (), "HeadBucket", {"Bucket": "bkt"}),
    ("bkt.s3.amazonaws.com", "GET", "/a/b%20c.txt", "versionId=3", (), "GetObject",
     {"Bucket": "bkt", "Key": "a/b c.txt", "versionId": "3"}),
    ("bkt.s3.amazonaws.com", "GET", "/dir/", "", (), "GetObject", {"Bucket": "bkt", "Key": "dir/"}),
    ("bkt.s3.amazonaws.com", "GET", "/a%2Fb", "", (), "GetObject", {"Bucket": "bkt", "Key": "a/b"}),
    ("s3.amazonaws.com", "DELETE", "/bkt/k", "", (), "DeleteObject", {"Bucket": "bkt", "Key": "k"}),
    ("bkt.s3.amazonaws.com", "DELETE", "/k", "tagging", (), "DeleteObjectTagging", BK),
    ("bkt.s3.amazonaws.com", "DELETE", "/k", "uploadId=u1", (), "AbortMultipartUpload",
     {"Bucket": "bkt", "Key": "k", "uploadId": "u1"}),
    ("bkt.s3.amazonaws.com", "PUT", "/k", "", (("x-amz-acl", "public-read"),), "PutObject",
     {"Bucket": "bkt", "Key": "k", "x-amz-acl": "public-read"}),
    ("bkt.s3.amazonaws.com", "PUT", "/k", "", (("X-Amz-Copy-Source", "src/k"),), "CopyObject",
     {"Bucket": "bkt", "Key": "k", "x-amz-copy-source": "src/k"}),
    ("bkt.s3.amazonaws.com", "PUT", "/k", "partNumber=1&uploadId=u", (), "UploadPart",
     {"Bucket": "bkt", "Key": "k", "partNumber": "1", "uploadId": "u"}),
    ("bkt.s3.amazonaws.com", "PUT", "/k", "partNumber=1&uploadId=u", (("x-amz-copy-source", "s/k"),),
     "UploadPartCopy", {"Bucket": "bkt", "Key": "k", "partNumber": "1", "uploadId": "u",
                        "x-amz-copy-source": "s/k"}),
    ("bkt.s3.amazonaws.com", "GET", "/k", "uploadId=u", (), "ListParts", {"Bucket": "bkt", "Key": "k",
                                                                          "uploadId": "u"}),
    ("bkt.s3.amazonaws.com", "HEAD", "/k", "", (), "HeadObject", {"Bucket": "bkt", "Key": "k"}),
    ("bkt.s3.amazonaws.com", "POST", "/k", "uploads", (), "CreateMultipartUpload", BK),
    ("bkt.s3.amazonaws.com", "GET", "/k", "x-id=GetObject", (), "GetObject", {"Bucket": "bkt", "Key": "k"}),
    ("bkt.s3.amazonaws.com", "GET", "/k", "X-Amz-Credential=a&X-Amz-Signature=b", (), "GetObject",
     {"Bucket": "bkt", "Key": "k"}),
    # method overrides are judged as the method they ask for
    ("bkt.s3.amazonaws.com", "POST", "/k", "", (("X-HTTP-Method-Override", "DELETE"),), "DeleteObject",
     {"Bucket": "bkt", "Key": "k"}),
    ("bkt.s3.amazonaws.com", "POST", "/k", "", (("X-HTTP-Method", "delete"),), "DeleteObject",
     {"Bucket": "bkt", "Key": "k"}),
    ("bkt.s3.amazonaws.com", "DELETE", "/k", "", (("X-HTTP-Method-Override", "DELETE"),), "DeleteObject", BK),
    ("bkt.s3.amazonaws.com", "POST", "/k", "_method=DELETE", (), "DeleteObject", {"Bucket": "bkt", "Key": "k",
                                                                                  "_method": "DELETE"}),
    ("bkt.s3.amazonaws.com", "POST", "/k", "", (FORM,), "DeleteObject", {"Bucket": "bkt", "Key": "k"}),
]


@pytest.mark.parametrize(("host", "method", "path", "query", "headers", "operation", "arguments"), S3_CASES)
def test_s3(host: str, method: str, path: str, query: str, headers: tuple[tuple[str, str], ...],
            operation: str, arguments: dict[str, object]) -> None:
    body = b"_method=delete" if FORM in headers else b""
    result = op(classify(req(host, method, path, query, headers, body)))
    assert (result.service, result.operation, result.api) == ("s3", operation, f"aws.s3.{operation}")
    assert result.arguments == arguments


S3_REFUSED = [
    ("POST", "/", "delete&tagging", (), ("tagging",)),
    ("PUT", "/k", "tagging&acl", (), ("could be",)),
    ("GET", "/", "Tagging", (), ("case variant",)),
    ("DELETE", "/k", "x-id=GetObject", (), ("x-id",)),
    ("GET", "/k", "versionId=1&versionId=2", (), ("twice",)),
    ("GET", "/", "list-type=1", (), ("list-type",)),
    ("POST", "/k", "", (("X-HTTP-Method-Override", "DELETE"), ("X-Method-Override", "GET")), ("disagree",)),
    ("POST", "/k", "_method=GET", (("X-HTTP-Method-Override", "DELETE"),), ("disagree",)),
    ("POST", "/k", "", (("X-HTTP-Method-Override", "PURGE"),), ("tether classifies",)),
    ("POST", "/k", "", (("X-HTTP-Method-Override", "DELETE, GET"),), ("tether classifies",)),
    # an override can only be carried by a POST: a DELETE dressed as a GET is refused
    ("DELETE", "/k", "", (("X-HTTP-Method-Override", "GET"),), ("only post",)),
    ("DELETE", "/k", "_method=GET", (), ("only post",)),
    ("PUT", "/k", "", (("X-HTTP-Method", "PUT"), ("X-Method-Override", "DELETE")), ("disagree",)),
    # a POST that is an operation of its own cannot be overridden into another
    ("POST", "/", "delete", (("X-HTTP-Method-Override", "GET"),), ("delete",)),
    ("POST", "/k", "uploads", (("X-HTTP-Method-Override", "PUT"),), ("uploads",)),
    ("POST", "/k", "", (("X_HTTP_Method_Override", "DELETE"),), ("look-alike",)),
    ("PUT", "/k", "", (("x-amz-acl", "private"), ("x-amz-acl", "public-read")), ("different values",)),
    ("GET", "/%zz", "", (), ("percent",)),
]


@pytest.mark.parametrize(("method", "path", "query", "headers", "words"), S3_REFUSED)
def test_s3_ambiguities_are_refused(method: str, path: str, query: str,
                                    headers: tuple[tuple[str, str], ...], words: tuple[str, ...]) -> None:
    refused(classify(req("bkt.s3.amazonaws.com", method, path, query, headers)), *words)


@pytest.mark.parametrize(("method", "path"), [("PATCH", "/k"), ("OPTIONS", "/k"), ("POST", "/k")])
def test_s3_requests_without_an_operation_are_unclassified(method: str, path: str) -> None:
    result = classify(req("bkt.s3.amazonaws.com", method, path))
    assert isinstance(result, Unclassified) and result.service == "s3"


@pytest.mark.parametrize(("body", "words"), [
    (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x "y">]><Delete><Object><Key>&x;</Key></Object></Delete>',
     ("doctype",)),
    (b"<Delete><Object><Key>a</Key>", ("not valid xml",)),
    (b"<Remove><Object><Key>a</Key></Object></Remove>", ("<delete>",)),
    (b"<Delete><Object><Key>a</Key><Key>b</Key></Object></Delete>", ("two places",)),
    (b"<Delete><Thing/></Delete>", ("unexpected",)),
])
def test_s3_delete_objects_body_is_read_strictly(body: bytes, words: tuple[str, ...]) -> None:
    refused(classify(req("bkt.s3.amazonaws.com", "POST", "/", "delete", body=body)), *words)


# ---------------------------------------------------------------- real botocore requests


class _Captured(Exception):
    def __init__(self, request: Any) -> None:
        self.request = request


_CONFIG = botocore.config.Config(parameter_validation=False, retries={"max_attempts": 0})


def _client(service: str, region: str = "us-east-1") -> Any:
    client = boto3.client(service, region_name=region, aws_access_key_id="AKIDEXAMPLE",
                          aws_secret_access_key="secret", config=_CONFIG)

    def stop(request: Any, **_: object) -> None:
        raise _Captured(request)

    client.meta.events.register("before-send", stop)
    return client


def wire(client: Any, method: str, **params: object) -> HttpRequest:
    """The request botocore would send, signed, captured before it leaves."""
    try:
        getattr(client, method)(**params)
    except _Captured as c:
        r = c.request
    else:  # pragma: no cover - before-send always raises
        raise AssertionError("the request was sent")
    url = urlsplit(r.url)
    body = r.body
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = body.read()
    headers = tuple((k, v.decode() if isinstance(v, bytes) else v) for k, v in r.headers.items())
    return HttpRequest(r.method, url.scheme, url.hostname or "", url.port or 443, url.path or "/", url.query,
                       headers, body)


BOTOCORE = [
    # (service, method, params, api, effect, arguments that must be present)
    ("ec2", "delete_volume", {"VolumeId": "vol-0123"}, "aws.ec2.DeleteVolume", Effect.WRITE,
     {"VolumeId": "vol-0123"}),
    ("ec2", "describe_volumes", {"VolumeIds": ["vol-1", "vol-2"],
                                 "Filters": [{"Name": "tag:env", "Values": ["production"]}]},
     "aws.ec2.DescribeVolumes", Effect.READ,
     {"VolumeId": ["vol-1", "vol-2"], "Filter": [{"Name": "tag:env", "Value": ["production"]}]}),
    ("ec2", "terminate_instances", {"InstanceIds": ["i-1"]}, "aws.ec2.TerminateInstances", Effect.WRITE,
     {"InstanceId": ["i-1"]}),
    ("ec2", "get_password_data", {"InstanceId": "i-1"}, "aws.ec2.GetPasswordData", Effect.WRITE, {}),
    ("s3", "delete_object", {"Bucket": "prod-data", "Key": "db/backup 1.sql"}, "aws.s3.DeleteObject",
     Effect.WRITE, {"Bucket": "prod-data", "Key": "db/backup 1.sql"}),
    ("s3", "get_object", {"Bucket": "prod-data", "Key": "k"}, "aws.s3.GetObject", Effect.READ, {"Key": "k"}),
    ("s3", "delete_objects",
     {"Bucket": "b", "Delete": {"Objects": [{"Key": "a"}, {"Key": "b", "VersionId": "2"}]}},
     "aws.s3.DeleteObjects", Effect.WRITE,
     {"Delete": {"Objects": [{"Key": "a"}, {"Key": "b", "VersionId": "2"}]}}),
    ("s3", "put_bucket_policy", {"Bucket": "b", "Policy": "{}"}, "aws.s3.PutBucketPolicy", Effect.WRITE, {}),
    ("s3", "list_objects_v2", {"Bucket": "b", "Prefix": "p/"}, "aws.s3.ListObjectsV2", Effect.READ,
     {"prefix": "p/"}),
    ("dynamodb", "delete_table", {"TableName": "orders"}, "aws.dynamodb.DeleteTable", Effect.WRITE,
     {"TableName": "orders"}),
    ("dynamodb", "batch_get_item", {"RequestItems": {"t": {"Keys": [{"k": {"S": "v"}}]}}},
     "aws.dynamodb.BatchGetItem", Effect.READ, {}),
    ("dynamodb", "batch_write_item", {"RequestItems": {}}, "aws.dynamodb.BatchWriteItem", Effect.WRITE, {}),
    ("iam", "create_user", {"UserName": "u", "Tags": [{"Key": "env", "Value": "prod"}]}, "aws.iam.CreateUser",
     Effect.WRITE, {"Tags": [{"Key": "env", "Value": "prod"}]}),
    ("sts", "assume_role", {"RoleArn": "arn:aws:iam::1:role/r", "RoleSessionName": "s"},
     "aws.sts.AssumeRole", Effect.WRITE, {}),
    ("sts", "get_caller_identity", {}, "aws.sts.GetCallerIdentity", Effect.READ, {}),
    ("secretsmanager", "get_secret_value", {"SecretId": "db"}, "aws.secretsmanager.GetSecretValue",
     Effect.WRITE, {"SecretId": "db"}),
    ("secretsmanager", "list_secrets", {}, "aws.secretsmanager.ListSecrets", Effect.READ, {}),
    ("kms", "decrypt", {"CiphertextBlob": b"x"}, "aws.kms.Decrypt", Effect.WRITE, {}),
    ("ssm", "get_parameter", {"Name": "p", "WithDecryption": True}, "aws.ssm.GetParameter", Effect.WRITE, {}),
    ("ssm", "get_parameter", {"Name": "p", "WithDecryption": False}, "aws.ssm.GetParameter", Effect.READ, {}),
    ("ssm", "get_parameter", {"Name": "p"}, "aws.ssm.GetParameter", Effect.READ, {}),
    ("ssm", "get_parameters_by_path", {"Path": "/", "WithDecryption": True}, "aws.ssm.GetParametersByPath",
     Effect.WRITE, {}),
    ("sqs", "delete_queue", {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q"}, "aws.sqs.DeleteQueue",
     Effect.WRITE, {}),
    ("sns", "create_topic", {"Name": "t", "Attributes": {"a": "1"}}, "aws.sns.CreateTopic", Effect.WRITE,
     {"Attributes": {"a": "1"}}),
    ("cloudwatch", "delete_alarms", {"AlarmNames": ["a"]}, "aws.cloudwatch.DeleteAlarms", Effect.WRITE, {}),
    ("lambda", "delete_function", {"FunctionName": "f"}, "aws.lambda.DeleteFunction", Effect.WRITE,
     {"FunctionName": "f"}),
    ("lambda", "invoke", {"FunctionName": "f", "Payload": b'{"env": "prod"}'}, "aws.lambda.Invoke",
     Effect.WRITE, {"FunctionName": "f", "Payload": {"env": "prod"}}),
    ("lambda", "create_function", {"FunctionName": "f", "Role": "r", "Code": {"ZipFile": b"z"},
                                   "Tags": {"env": "prod"}}, "aws.lambda.CreateFunction", Effect.WRITE,
     {"Tags": {"env": "prod"}}),
    ("eks", "delete_cluster", {"name": "prod"}, "aws.eks.DeleteCluster", Effect.WRITE, {"name": "prod"}),
]


@pytest.mark.parametrize(("service", "method", "params", "api", "effect", "arguments"), BOTOCORE)
def test_botocore_requests(service: str, method: str, params: dict[str, object], api: str, effect: Effect,
                           arguments: dict[str, object]) -> None:
    result = op(classify(wire(_client(service), method, **params)))
    assert (result.api, result.effect) == (api, effect), result.effect_reason
    for key, value in arguments.items():
        assert result.arguments[key] == value


def test_botocore_query_request_sent_as_get_reads_the_query_string() -> None:
    post = wire(_client("ec2"), "delete_volume", VolumeId="vol-1")
    get = HttpRequest("GET", "https", post.host, 443, "/", post.body.decode(), (), b"")
    assert op(classify(get)) == op(classify(post))
    both = HttpRequest("POST", "https", post.host, 443, "/", "Action=DescribeVolumes", post.headers,
                       post.body)
    refused(classify(both), "twice")


def test_botocore_region_and_addressing_styles() -> None:
    virtual = wire(_client("s3", "eu-west-1"), "delete_object", Bucket="bkt1", Key="k")
    assert virtual.host == "bkt1.s3.eu-west-1.amazonaws.com"
    path_client = boto3.client("s3", region_name="eu-west-1", aws_access_key_id="A",
                               aws_secret_access_key="s",
                               config=_CONFIG.merge(botocore.config.Config(s3={"addressing_style": "path"})))
    path_client.meta.events.register("before-send", lambda request, **_: (_ for _ in ()).throw(
        _Captured(request)))
    path_style = wire(path_client, "delete_object", Bucket="bkt1", Key="k")
    assert path_style.path == "/bkt1/k"
    for request in (virtual, path_style):
        result = op(classify(request))
        assert (result.api, result.region, result.arguments["Bucket"]) == ("aws.s3.DeleteObject", "eu-west-1",
                                                                          "bkt1")


# Botocore operations whose request cannot be told from another one's on the wire
# (deprecated twins, and directory buckets' list on the S3 Express endpoint).
TWINS = {"GetBucketLifecycle": "GetBucketLifecycleConfiguration",
         "GetBucketNotification": "GetBucketNotificationConfiguration",
         "PutBucketLifecycle": "PutBucketLifecycleConfiguration",
         "PutBucketNotification": "PutBucketNotificationConfiguration",
         "ListDirectoryBuckets": "ListBuckets"}


def _dummy(shape: Any) -> object:
    kind = shape.type_name
    if kind == "structure":
        return {m: _dummy(shape.members[m]) for m in shape.required_members}
    if kind == "list":
        return [_dummy(shape.member)]
    if kind == "map":
        return {"k": _dummy(shape.value)}
    if kind in ("integer", "long"):
        return 1
    if kind in ("float", "double"):
        return 1.5
    if kind == "boolean":
        return True
    if kind == "blob":
        return b'{"a": 1}'
    if kind == "timestamp":
        return datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return shape.enum[0] if shape.enum else "abc1"


def _all_operations(services: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    session = botocore.session.get_session()
    for service in services:
        model = session.get_service_model(service)
        for name in model.operation_names:
            endpoint = model.operation_model(name).endpoint
            if not (endpoint and endpoint.get("hostPrefix")):
                yield service, name


@pytest.mark.parametrize("service", ["s3", "lambda", "eks", "route53", "ec2", "iam", "sts", "sns",
                                     "dynamodb", "kms", "secretsmanager", "logs", "ssm", "sqs"])
def test_every_botocore_operation_is_named(service: str) -> None:
    """Every operation of these services, as botocore serialises it, is classified as itself."""
    client = _client(service, "us-west-2")
    to_python = {v: k for k, v in client.meta.method_to_api_mapping.items()}
    model = client.meta.service_model
    wrong = []
    for _, name in _all_operations((service,)):
        shape = model.operation_model(name).input_shape
        params = _dummy(shape) if shape is not None else {}
        assert isinstance(params, dict)
        result = classify(wire(client, to_python[name], **params))
        if not isinstance(result, CloudOperation) or result.operation != TWINS.get(name, name):
            wrong.append((name, result))
    assert not wrong


def rest_tables_from_botocore() -> dict[str, dict[str, object]]:
    """The REST tables as the catalog should hold them, rebuilt from the installed botocore."""
    session = botocore.session.get_session()
    out: dict[str, dict[str, object]] = {}
    for service in ("s3", "lambda", "eks", "route53"):
        model = session.get_service_model(service)
        rows: dict[str, dict[str, object]] = {}
        seen: set[tuple[object, ...]] = set()
        names = sorted(model.operation_names, key=lambda n: (model.operation_model(n).deprecated, n))
        for name in names:
            operation = model.operation_model(name)
            if operation.endpoint and operation.endpoint.get("hostPrefix"):
                continue
            shape = operation.input_shape
            query: list[str] = []
            headers: list[str] = []
            payload = None
            if shape is not None:
                for member, ms in shape.members.items():
                    if member in shape.required_members and ms.serialization.get("location") == "querystring":
                        query.append(ms.serialization.get("name", member))
                    if member in shape.required_members and ms.serialization.get("location") == "header":
                        headers.append(ms.serialization.get("name", member).lower())
                payload = shape.serialization.get("payload")
            signature = (operation.http["method"], operation.http["requestUri"].rstrip("/"),
                         tuple(sorted(query)), tuple(sorted(headers)))
            if signature in seen:
                continue
            seen.add(signature)
            row: dict[str, object] = {"method": operation.http["method"], "uri": operation.http["requestUri"]}
            if query:
                row["query"] = sorted(query)
            if headers:
                row["headers"] = sorted(headers)
            if payload and model.protocol == "rest-json":
                row["payload"] = payload
            rows[name] = row
        out[service] = {"protocol": model.protocol, "operations": dict(sorted(rows.items()))}
    return out


def test_catalog_rest_tables_match_botocore() -> None:
    """The shipped tables are what botocore says; on a botocore upgrade this shows the new table."""
    from importlib import resources

    import yaml

    text = resources.files("proxy.policy").joinpath("cloud_catalog.yaml").read_text(encoding="utf-8")
    shipped = yaml.safe_load(text)["aws"]["rest"]
    expected = rest_tables_from_botocore()
    assert shipped == expected, "regenerate aws.rest in cloud_catalog.yaml:\n" + yaml.safe_dump(expected)


# ---------------------------------------------------------------- Azure ARM

def arm(method: str, path: str = ARM, query: str = "api-version=2023-04-02",
        headers: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> HttpRequest:
    return req("management.azure.com", method, path, query, headers, body)


AZURE_CASES = [
    # (method, path, operation, effect, arguments that must be present)
    ("DELETE", ARM, "Microsoft.Compute/disks/delete", Effect.WRITE,
     {"subscriptionId": "sub1", "resourceGroupName": "rg1", "resourceName": "disk1", "resourceId": ARM}),
    ("GET", ARM, "Microsoft.Compute/disks/read", Effect.READ, {"resourceName": "disk1"}),
    ("HEAD", ARM, "Microsoft.Compute/disks/read", Effect.READ, {}),
    ("PATCH", ARM, "Microsoft.Compute/disks/write", Effect.WRITE, {}),
    ("GET", ARM.rsplit("/", 1)[0], "Microsoft.Compute/disks/read", Effect.READ, {"resourceGroupName": "rg1"}),
    ("DELETE", "/subscriptions/sub1/resourcegroups/rg1",
     "Microsoft.Resources/subscriptions/resourceGroups/delete",
     Effect.WRITE, {"resourceGroupName": "rg1"}),
    ("GET", "/subscriptions", "Microsoft.Resources/subscriptions/read", Effect.READ, {}),
    ("GET", "/subscriptions/sub1/resourceGroups", "Microsoft.Resources/subscriptions/resourceGroups/read",
     Effect.READ, {"subscriptionId": "sub1"}),
    ("POST", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/acct/listKeys",
     "Microsoft.Storage/storageAccounts/listKeys/action", Effect.WRITE,
     {"resourceId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/acct"}),
    ("POST", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1/start",
     "Microsoft.Compute/virtualMachines/start/action", Effect.WRITE, {"resourceName": "vm1"}),
    ("PUT", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1/extensions/e",
     "Microsoft.Compute/virtualMachines/extensions/write", Effect.WRITE, {"resourceName": "e"}),
    ("POST", "/subscriptions/s/providers/Microsoft.Compute/register", "Microsoft.Compute/register/action",
     Effect.WRITE, {}),
    ("GET", "/subscriptions/s/providers/Microsoft.Compute",
     "Microsoft.Resources/subscriptions/providers/read",
     Effect.READ, {}),
    ("GET", "/providers/Microsoft.Compute/operations", "Microsoft.Compute/operations/read", Effect.READ, {}),
    ("PUT", ARM + "/providers/Microsoft.Authorization/locks/lock1", "Microsoft.Authorization/locks/write",
     Effect.WRITE, {"scope": ARM, "resourceName": "lock1"}),
    # ARM paths are case-insensitive: the same operation whatever the spelling
    ("DELETE", "/SUBSCRIPTIONS/sub1/RESOURCEGROUPS/rg1/PROVIDERS/MICROSOFT.COMPUTE/DISKS/disk1",
     "Microsoft.Compute/disks/delete", Effect.WRITE, {"resourceId": ARM}),
    ("DELETE", ARM + "/", "Microsoft.Compute/disks/delete", Effect.WRITE, {}),
]


@pytest.mark.parametrize(("method", "path", "operation", "effect", "arguments"), AZURE_CASES)
def test_azure_arm(method: str, path: str, operation: str, effect: Effect,
                   arguments: dict[str, object]) -> None:
    result = op(classify(arm(method, path)))
    assert (result.cloud, result.operation, result.api, result.effect) == (
        "azure", operation, f"azure.{operation}", effect)
    assert result.service == operation.split("/")[0]
    assert result.arguments["apiVersion"] == "2023-04-02"
    for key, value in arguments.items():
        assert result.arguments[key] == value


def test_azure_body_query_and_region() -> None:
    body = json.dumps({"location": "westeurope", "tags": {"env": "production"}}).encode()
    result = op(classify(arm("PUT", query="api-version=2023-04-02&$expand=x&$expand=y", body=body)))
    assert result.operation == "Microsoft.Compute/disks/write" and result.region == "westeurope"
    assert result.arguments["body"] == {"location": "westeurope", "tags": {"env": "production"}}
    assert result.arguments["query"] == {"$expand": ["x", "y"]}


AZURE_REFUSED = [
    ("DELETE", ARM, "", (), b"", ("api-version",)),
    ("DELETE", ARM, "api-version=", (), b"", ("api-version",)),
    ("DELETE", ARM, "api-version=2023-04-02&API-VERSION=2020-01-01", (), b"", ("api-version",)),
    ("POST", "/batch", "api-version=2020-06-01", (), b'{"requests": []}', ("batch",)),
    ("POST", "/$batch", "api-version=2020-06-01", (), b"{}", ("batch",)),
    ("PUT", ARM, "api-version=1", (), b'{"tags": {"env": "dev"}, "tags": {"env": "production"}}',
     ("duplicate key",)),
    ("PUT", ARM, "api-version=1", (), b"{not json", ("not valid json",)),
    ("POST", ARM, "api-version=1", (("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "GET")),
     b"", ("disagree",)),
    ("POST", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a/listKeys",
     "api-version=1", (("X-HTTP-Method-Override", "GET"),), b"", ("listKeys/action",)),
    ("DELETE", ARM, "api-version=1", (("X-HTTP-Method-Override", "GET"),), b"", ("only post",)),
    ("GET", "/subscriptions/s//resourceGroups", "api-version=1", (), b"", ("empty segment",)),
]


@pytest.mark.parametrize(("method", "path", "query", "headers", "body", "words"), AZURE_REFUSED)
def test_azure_ambiguities_are_refused(method: str, path: str, query: str,
                                       headers: tuple[tuple[str, str], ...], body: bytes,
                                       words: tuple[str, ...]) -> None:
    refused(classify(arm(method, path, query, headers, body)), *words)


@settings(max_examples=100)
@given(st.lists(st.booleans(), min_size=100, max_size=100))
def test_azure_spelling_never_changes_the_operation(flips: list[bool]) -> None:
    """ARM folds case in its fixed words and type names; so does tether."""
    path = "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1/start"
    cut = path.index("/vm1")
    head = "".join(c.swapcase() if flip else c for c, flip in zip(path[:cut], flips, strict=False))
    result = op(classify(arm("POST", head + path[cut:])))
    assert result.api == "azure.Microsoft.Compute/virtualMachines/start/action"
    assert result.arguments["resourceName"] == "vm1" and "scope" not in result.arguments


def test_azure_method_override_and_unclassified_shapes() -> None:
    overridden = op(classify(arm("POST", headers=(("X-HTTP-Method-Override", "DELETE"),))))
    assert overridden.operation == "Microsoft.Compute/disks/delete"
    for method, path in (("GET", "/foo/bar"), ("POST", ARM), ("PUT", ARM.rsplit("/", 1)[0])):
        result = classify(arm(method, path))
        assert isinstance(result, Unclassified), (method, path, result)


# ---------------------------------------------------------------- GCP REST

CP = "/compute/v1/projects/p1/zones/us-central1-a"
GCP_CASES = [
    # (host, method, path, query, operation, effect, arguments that must be present)
    ("compute.googleapis.com", "DELETE", CP + "/disks/d1", "", "compute.disks.delete", Effect.WRITE,
     {"project": "p1", "zone": "us-central1-a", "disk": "d1",
      "name": "projects/p1/zones/us-central1-a/disks/d1"}),
    ("compute.googleapis.com", "GET", CP + "/disks/d1", "", "compute.disks.get", Effect.READ, {"disk": "d1"}),
    ("compute.googleapis.com", "GET", CP + "/disks", "filter=x", "compute.disks.list", Effect.READ,
     {"query": {"filter": "x"}}),
    ("compute.googleapis.com", "POST", CP + "/disks", "", "compute.disks.create", Effect.WRITE, {}),
    ("compute.googleapis.com", "PATCH", CP + "/instances/i1", "", "compute.instances.update", Effect.WRITE,
     {}),
    ("compute.googleapis.com", "POST", CP + "/instances/i1/stop", "", "compute.instances.stop", Effect.WRITE,
     {"instance": "i1"}),
    ("compute.googleapis.com", "POST", CP + "/instances/i1:stop", "", "compute.instances.stop", Effect.WRITE,
     {"instance": "i1"}),
    ("compute.googleapis.com", "GET", CP + "/instances/i1/getSerialPortOutput", "",
     "compute.instances.getSerialPortOutput", Effect.READ, {}),
    ("compute.googleapis.com", "GET", "/compute/v1/projects/p1/global/images", "", "compute.images.list",
     Effect.READ, {"project": "p1"}),
    ("compute.googleapis.com", "DELETE", "/compute/v1/projects/p1/global/images/im", "",
     "compute.images.delete",
     Effect.WRITE, {"image": "im"}),
    ("compute.googleapis.com", "GET", "/compute/beta/projects/p1/zones", "", "compute.zones.list",
     Effect.READ, {}),
    ("compute.googleapis.com", "GET", "/compute/v1/projects/p1/aggregated/instances", "",
     "compute.instances.list", Effect.READ, {}),
    ("compute.googleapis.com", "POST", "/compute/v1/projects/p1/setCommonInstanceMetadata", "",
     "compute.projects.setCommonInstanceMetadata", Effect.WRITE, {}),
    ("compute.googleapis.com", "GET", "/compute/v1/projects/p1/regions/us-east1/addresses/a", "",
     "compute.addresses.get", Effect.READ, {"region": "us-east1", "address": "a"}),
    ("www.googleapis.com", "DELETE", CP + "/disks/d1", "", "compute.disks.delete", Effect.WRITE, {}),
    ("secretmanager.googleapis.com", "GET", "/v1/projects/p/secrets/s/versions/latest:access", "",
     "secretmanager.versions.access", Effect.WRITE, {"secret": "s", "version": "latest"}),
    ("secretmanager.googleapis.com", "GET", "/v1/projects/p/secrets", "", "secretmanager.secrets.list",
     Effect.READ, {}),
    ("cloudresourcemanager.googleapis.com", "POST", "/v3/projects/p:getIamPolicy", "",
     "cloudresourcemanager.projects.getIamPolicy", Effect.READ, {}),
    ("cloudresourcemanager.googleapis.com", "POST", "/v3/projects/p:setIamPolicy", "",
     "cloudresourcemanager.projects.setIamPolicy", Effect.WRITE, {}),
    ("cloudresourcemanager.googleapis.com", "POST", "/v3/projects/p:testIamPermissions", "",
     "cloudresourcemanager.projects.testIamPermissions", Effect.READ, {}),
    ("container.googleapis.com", "DELETE", "/v1/projects/p/locations/europe-west1/clusters/prod", "",
     "container.clusters.delete", Effect.WRITE, {"location": "europe-west1", "cluster": "prod"}),
    ("storage.googleapis.com", "DELETE", "/storage/v1/b/bkt/o/a%2Fb.txt", "", "storage.objects.delete",
     Effect.WRITE, {"bucket": "bkt", "object": "a/b.txt"}),
    ("storage.googleapis.com", "GET", "/storage/v1/b", "project=p", "storage.buckets.list", Effect.READ, {}),
    ("storage.googleapis.com", "POST", "/upload/storage/v1/b/bkt/o", "uploadType=media&name=x",
     "storage.objects.create", Effect.WRITE, {"bucket": "bkt"}),
    ("storage.googleapis.com", "POST", "/storage/v1/b/src/o/a/rewriteTo/b/dst/o/z", "",
     "storage.objects.rewriteTo", Effect.WRITE, {"destination": {"bucket": "dst", "object": "z"}}),
    ("us-central1-aiplatform.googleapis.com", "DELETE", "/v1/projects/p/locations/us-central1/endpoints/e",
     "",
     "aiplatform.endpoints.delete", Effect.WRITE, {}),
    ("compute.googleapis.com", "POST", CP + "/disks/d1", "", "compute.disks.delete", Effect.WRITE, {}),
]


@pytest.mark.parametrize(("host", "method", "path", "query", "operation", "effect", "arguments"), GCP_CASES)
def test_gcp(host: str, method: str, path: str, query: str, operation: str, effect: Effect,
             arguments: dict[str, object]) -> None:
    headers = (("X-HTTP-Method-Override", "DELETE"),) if method == "POST" and path.endswith("/d1") else ()
    result = op(classify(req(host, method, path, query, headers)))
    assert (result.cloud, result.operation, result.api, result.effect) == (
        "gcp", operation, f"gcp.{operation}", effect), result.effect_reason
    for key, value in arguments.items():
        assert result.arguments[key] == value


def test_gcp_json_method_field_is_an_override() -> None:
    result = op(classify(req("compute.googleapis.com", "POST", CP + "/disks/d1",
                             headers=(("Content-Type", "application/json"),), body=b'{"_method": "DELETE"}')))
    assert result.api == "gcp.compute.disks.delete"


def test_gcp_body_region_and_secret_params() -> None:
    body = json.dumps({"name": "d2", "labels": {"env": "prod"}}).encode()
    result = op(classify(req("compute.googleapis.com", "POST", CP + "/disks", "key=AIzaSECRET&access_token=t",
                             (("Content-Type", "application/json"),), body)))
    assert result.arguments["body"] == {"name": "d2", "labels": {"env": "prod"}}
    assert "query" not in result.arguments and result.region == "us-central1-a"


GCP_REFUSED = [
    ("POST", CP + "/instances/i1%3Astop", (), b"", ("encoded ':'",)),
    ("POST", CP + "/instances/i1:st op", (), b"", ("custom method",)),
    ("POST", CP + "/instances/i1/stop:start", (), b"", ("two custom methods",)),
    ("POST", "/batch/compute/v1", (), b"", ("batch",)),
    ("POST", CP + "/disks", (("Content-Type", "application/json"),), b'{"name": "a", "name": "b"}',
     ("duplicate key",)),
    ("POST", CP + "/disks/d1", (("X-HTTP-Method-Override", "DELETE"), FORM), b"_method=GET", ("disagree",)),
    ("POST", CP + "/disks/d1", (FORM,), b"_method=DELETE&_method=GET", ("disagree",)),
    ("POST", CP + "/disks/d1", (("X-HTTP-Method-Override", "DELETE"),), b'{"_method": "GET"}', ("disagree",)),
    ("POST", CP + "/disks", (("X-HTTP-Method-Override", "GET"),), b"", ("compute.disks.create",)),
    ("DELETE", CP + "/disks/d1", (("X-HTTP-Method-Override", "GET"),), b"", ("only post",)),
    ("POST", CP + "/disks/d1", (("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method-Override", "GET")),
     b"", ("disagree",)),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "words"), GCP_REFUSED)
def test_gcp_ambiguities_are_refused(method: str, path: str, headers: tuple[tuple[str, str], ...],
                                     body: bytes, words: tuple[str, ...]) -> None:
    refused(classify(req("compute.googleapis.com", method, path, "", headers, body)), *words)


@pytest.mark.parametrize(("host", "method", "path"), [
    ("compute.googleapis.com", "GET", "/compute/projects/p"),
    ("compute.googleapis.com", "PUT", CP + "/disks"),
    ("compute.googleapis.com", "POST", "/compute/v1"),
    ("www.googleapis.com", "GET", "/v1/projects/p"),
    ("www.googleapis.com", "GET", "/Compute%20x/v1/projects/p"),
    ("container.googleapis.com", "GET", "/v1/projects/p/locations/l/clusters/c/nodePools/n/x.y/z"),
])
def test_gcp_unknown_shapes_are_unclassified(host: str, method: str, path: str) -> None:
    result = classify(req(host, method, path))
    assert isinstance(result, Unclassified), result


# ---------------------------------------------------------------- effects and overrides

@pytest.mark.parametrize(("operation", "verb"), [
    ("DescribeVolumes", "Describe"), ("getIamPolicy", "get"), ("BatchGetItem", "Get"),
    ("BatchWriteItem", "Write"), ("ListObjectsV2", "List"), ("Scan", "Scan"), ("DELETEVOLUME", "D"),
    ("", ""), ("Batch", ""), ("42", ""),
])
def test_verb_of(operation: str, verb: str) -> None:
    assert verb_of(operation) == verb


def _with(overrides: Mapping[str, Effect | str]) -> Callable[[HttpRequest], CloudOperation]:
    catalog = builtin_catalog().with_overrides(overrides)
    return lambda request: op(classify(request, catalog))


SECRET = req("secretsmanager.us-east-1.amazonaws.com",
             headers=(("X-Amz-Target", "secretsmanager.GetSecretValue"),), body=b'{"SecretId": "db"}')
DESCRIBE = ec2("Action=DescribeVolumes")
UNKNOWN_VERB = ec2("Action=FrobnicateVolume")


def test_conditional_override_sees_every_spelling_of_its_argument() -> None:
    body = b'{"Name": "p", "WithDecryption": true, "withDecryption": false}'
    target = ("X-Amz-Target", "AmazonSSM.GetParameter")
    result = op(classify(req("ssm.us-east-1.amazonaws.com", headers=(target,), body=body)))
    assert result.effect is Effect.WRITE


def test_effects_from_verbs_and_builtin_overrides() -> None:
    assert op(classify(DESCRIBE)).effect is Effect.READ
    unknown = op(classify(UNKNOWN_VERB))
    assert unknown.effect is Effect.WRITE and "unknown verb" in unknown.effect_reason
    secret = op(classify(SECRET))
    assert secret.effect is Effect.WRITE and "returns the secret" in secret.effect_reason


@pytest.mark.parametrize(("overrides", "request_", "effect"), [
    ({"aws.secretsmanager.GetSecretValue": "read"}, SECRET, Effect.READ),       # config beats catalog
    ({"aws.secretsmanager.*": "read"}, SECRET, Effect.READ),
    ({"aws.ec2.FrobnicateVolume": Effect.READ}, UNKNOWN_VERB, Effect.READ),
    ({"AWS.EC2.frobnicatevolume": "read"}, UNKNOWN_VERB, Effect.READ),         # case-insensitive
    ({"aws.ec2.Describe*": "write"}, DESCRIBE, Effect.WRITE),
    ({"aws.ec2.*": "write", "aws.*.Describe*": "read"}, DESCRIBE, Effect.WRITE),  # globs: write wins
    ({"aws.ec2.*": "write", "aws.ec2.DescribeVolumes": "read"}, DESCRIBE, Effect.READ),  # exact wins
    ({"aws.ec2.DescribeVolumes": " READ "}, DESCRIBE, Effect.READ),
    ({"gcp.*": "write"}, DESCRIBE, Effect.READ),
])
def test_config_overrides(overrides: dict[str, Effect | str], request_: HttpRequest, effect: Effect) -> None:
    result = _with(overrides)(request_)
    assert result.effect is effect
    assert builtin_catalog().config == ()  # the built-in catalog is never changed in place


@pytest.mark.parametrize("overrides", [{"aws.*": "delete"}, {"": "read"}, {"aws.*": 1}])
def test_bad_config_overrides(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        builtin_catalog().with_overrides(overrides)


@pytest.mark.parametrize(("text", "words"), [
    ("verbs: {read: [Get]}\n", "aws"),
    ("verbs: {read: [Get], write: x}\naws: {}\nazure: {}\ngcp: {}\n", "list of strings"),
    ("verbs: {read: [Get], write: []}\noverrides: [{api: a, effect: maybe}]\naws: {}\nazure: {}\ngcp: {}\n",
     "read or write"),
    ("verbs: {read: [Get], write: []}\naws: {aliases: {}, customer_domains: [], rest: {s: {protocol: soap, "
     "operations: {}}}}\nazure: {}\ngcp: {}\n", "protocol"),
    ("verbs: {read: [Get], write: []}\naws: {aliases: {}, customer_domains: [], rest: {s: {"
     "protocol: rest-json, operations: {A: {method: GET, uri: /x}, B: {method: GET, uri: /x}}}}}\n"
     "azure: {}\ngcp: {}\n",
     "cannot be told from"),
    ("verbs: {read: [Get], write: []}\naws: {aliases: {}, customer_domains: [], rest: {s: {"
     "protocol: rest-json, operations: {A: {method: GET, uri: '/{X+}/y'}}}}}\nazure: {}\ngcp: {}\n",
     "greedy"),
    ("verbs: {read: [Get], read: [List]}\n", "duplicate key"),
])
def test_bad_catalogs_fail_at_load(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_catalog(text, "bad.yaml")


def test_builtin_catalog_loads_once() -> None:
    assert builtin_catalog() is builtin_catalog()
    assert {"s3", "lambda", "eks", "route53"} <= set(builtin_catalog().aws_rest)


# ---------------------------------------------------------------- properties

_NAME = st.from_regex(r"[A-Z][a-zA-Z]{0,6}", fullmatch=True)
_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
_LEAF = st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=3))
_VALUE = st.one_of(_LEAF, st.lists(st.dictionaries(_NAME, _LEAF, min_size=1, max_size=3), min_size=1,
                                   max_size=3))


def _flatten(value: object, prefix: str, out: dict[str, str]) -> None:
    """EC2-style flattening, as botocore's EC2Serializer writes lists and structures."""
    if isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, list):
        for i, item in enumerate(value, 1):
            _flatten(item, f"{prefix}.{i}", out)
    else:
        assert isinstance(value, dict)
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)


@settings(max_examples=200)
@given(st.dictionaries(_NAME, _VALUE, min_size=1, max_size=4))
def test_unflatten_inverts_ec2_flattening(params: dict[str, object]) -> None:
    flat: dict[str, str] = {}
    for key, value in params.items():
        _flatten(value, key, flat)
    assert unflatten(flat) == params
    body = "Action=RunInstances&" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in flat.items())
    assert op(classify(ec2(body))).arguments == params


@settings(max_examples=200)
@given(st.dictionaries(st.from_regex(r"[A-Z][a-zA-Z]{0,5}(\.[1-3])?", fullmatch=True), _TEXT, max_size=5),
       st.randoms(use_true_random=False))
def test_parameters_split_between_query_and_body_classify_alike(params: dict[str, str], rnd: Any) -> None:
    """Where each parameter travels (query or form body) never changes the result."""
    pairs = [("Action", "DescribeVolumes"), *params.items()]
    rnd.shuffle(pairs)
    cut = rnd.randint(0, len(pairs))

    def encode(items: list[tuple[str, str]]) -> str:
        return "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in items)

    whole = classify(ec2(encode(pairs)))
    split = classify(ec2(encode(pairs[cut:]), encode(pairs[:cut])))
    assert whole == split
