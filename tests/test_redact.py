"""Credentials never reach what is written or printed, and still reach the connection."""
from __future__ import annotations

import json

from vdistill.config import load_config
from vdistill.redact import redact, redact_text
from vdistill.storage import Storage


def test_url_userinfo_is_removed_anywhere_in_a_line():
    line = "open http://user:pa55@mlflow:5000/#/runs and s3://KEY:SECRET@bucket/key, mail me@example.com"
    assert redact_text(line) == "open http://mlflow:5000/#/runs and s3://bucket/key, mail me@example.com"


def test_a_password_containing_at_signs_is_removed_whole():
    assert redact_text("http://u:p@ss@w0rd@host:1/path@x") == "http://host:1/path@x"


def test_credential_keys_are_dropped_at_any_depth():
    tree = {"storage": {"access_key": "A", "secret_key": "S", "region": "r"}, "x": [{"token": "T", "ok": 1}]}
    assert redact(tree) == {"storage": {"region": "r"}, "x": [{"ok": 1}]}


def test_public_config_has_no_url_credentials():
    cfg = load_config(None, ["tracking.uri=http://user:pa55@host:5000", "storage.endpoint_url=http://KEY:SECRET@host"])
    public = cfg.public_dict()
    assert public["tracking"]["uri"] == "http://host:5000" and public["storage"]["endpoint_url"] == "http://host"
    assert not any(s in json.dumps(public) for s in ("pa55", "KEY", "SECRET"))
    assert cfg.tracking.uri == "http://user:pa55@host:5000"  # the real value is kept for connecting


def test_storage_repr_shows_no_keys():
    text = repr(Storage(endpoint_url="http://K:S3CR3T@host:9000", access_key="AKID", secret_key="TOPSECRET"))
    assert "host:9000" in text and not any(s in text for s in ("S3CR3T", "AKID", "TOPSECRET"))


def test_keys_in_the_endpoint_url_are_used_to_connect(s3_storage):
    storage, bucket = s3_storage
    host = storage.endpoint_url.removeprefix("http://")
    with_keys = Storage(endpoint_url=f"http://testing:testing@{host}", region="us-east-1")
    with_keys.write_text(f"{bucket}/hello.txt", "hi")
    assert storage.read_text(f"{bucket}/hello.txt") == "hi"
