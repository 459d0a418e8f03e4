"""Redaction: every spelling of a credential in text, every option name that holds one in a config."""

from __future__ import annotations

import pytest

from operators.config.loading import load_config
from operators.config.schema import resolved_config_text
from operators.config.secrets import redact, redact_text

SECRETS = ["hunter2pass", "AKIAEXAMPLEKEYID", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "c2FzLXNpZ25hdHVyZQ", "eyJhbGciOiJIUzI1NiJ9xyz",
           "wJalrXUtnFEMI/K7MDENGbPx"]


@pytest.mark.parametrize(
    "text",
    [
        "http://user:hunter2pass@host/corpus/part-0.jsonl",
        "s3://AKIAEXAMPLEKEYID:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@bucket/corpus/",
        "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY;EndpointSuffix=x",
        "https://acc.blob.core.windows.net/c/x.jsonl?sv=2022&sig=c2FzLXNpZ25hdHVyZQ&se=2030",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAEXAMPLEKEYID&X-Amz-Signature=c2FzLXNpZ25hdHVyZQ",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9xyz",
        "cannot read gs://user:hunter2pass@bucket/x: ClientError",
        "s3://AKIAEXAMPLEKEYID:wJalrXUtnFEMI/K7MDENGbPx@bucket/corpus/",  # a '/' in the secret, as AWS keys have
        'Invalid bucket name "AKIAEXAMPLEKEYID:wJalrXUtnFEMI/K7MDENGbPx@corpus": Bucket name must match',  # botocore's echo
    ],
)
def test_redact_text_removes_every_spelling_of_a_credential(text):
    clean = redact_text(text)
    assert "***" in clean and not any(secret in clean for secret in SECRETS), clean


def test_config_redaction_covers_option_spellings(tmp_path):
    options = {
        "key": "AKIAEXAMPLEKEYID", "secret": "hunter2pass", "token": "eyJhbGciOiJIUzI1NiJ9xyz",
        "SecretAccessKey": "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "aws_access_key_id": "AKIAEXAMPLEKEYID",
        "headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9xyz"}, "connection_string": "AccountKey=hunter2pass",
        "passphrase": "hunter2pass", "apikey": "hunter2pass", "sas": "c2FzLXNpZ25hdHVyZQ", "auth": ["u", "hunter2pass"],
        "client_kwargs": {"region_name": "us-east-1"},
    }
    cfg = load_config(None, [f"input.storage.options={options!r}".replace("'", '"'), "input.uri=http://u:hunter2pass@h/x.jsonl"])
    text = resolved_config_text(cfg)
    assert not any(secret in text for secret in SECRETS), text
    assert "us-east-1" in text  # what is no secret stays readable
    tree = redact({"exclude_special_tokens": True, "max_batch_tokens": 16384, "tokens": 5})
    assert tree == {"exclude_special_tokens": True, "max_batch_tokens": 16384, "tokens": 5}
