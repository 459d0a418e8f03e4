"""Secrets, kept out of every log line, error message, report and output file: which option names
hold one, the credentials a config spells (registered once it is read), and the rules that redact
them from URIs and text. The bottom of the house: it imports nothing of the product."""

from __future__ import annotations

import re
from typing import Any

# userinfo in a URI (scheme://user:secret@host) and secrets spelt as query or connection-string fields.
# A field counts where a query, a connection string or a message spells one (after ?, &, ;, #, a space,
# a quote, a comma or a bracket), never as a path segment: 'corpus/token=alpha/part-0.jsonl' is a
# Hive-style partition, and redacting it would make two shards look like one.
# A password may hold '/' (AWS secret keys often do): 'user:' then anything up to the '@'.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?P<cred>[^/@\s?#:'\"]*:[^@\s'\"]*|[^/@\s?#'\"]+)@")
# The same userinfo echoed without its scheme (botocore: 'Invalid bucket name "KEY:SECRET@bucket"').
_BARE_USERINFO = re.compile(r"(?<![\w/:.*-])(?P<cred>[A-Za-z0-9._~+-]{3,}:(?!//)[^\s@'\"]+)@(?=[\w.-])")
_SECRET_FIELDS = re.compile(
    r"(?P<k>(?:^|(?<=[?&;#\s'\"(,\[{]))(?:AccountKey|SharedAccessKey|SharedAccessSignature|password|pwd|sig|se?cret|token|access_token|"
    r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|api[_-]?key)=)(?P<v>[^;&\s'\"]+)",
    re.I,
)
_BEARER = re.compile(r"(?P<k>\b(?:Bearer|Basic)\s+)(?P<v>[A-Za-z0-9._~+/=-]{8,})")


_KNOWN_SECRETS: list[str] = []  # the registered credentials, longest first


def register_secrets(value: str, whole: bool = False) -> None:
    """Remember the credentials in `value` (the userinfo of any URI in it; all of it with `whole`,
    a secret-named option's value): redact_text removes them wherever they appear, however a
    library echoes them (botocore quotes a bucket name cut at the secret's first '/'). Kept: the
    whole userinfo, the password, its '/'-separated pieces of 8+ characters, and a user name of
    16+ (an access key id); a short user name ('user', 'reader') is no secret and stays."""
    found = set()
    for m in _URI_USERINFO.finditer(value):
        user, _, password = m.group("cred").partition(":")
        found.add(m.group("cred"))
        if len(user) >= 16:
            found.add(user)
        if len(password) >= 4:
            found.add(password)
        found.update(p for p in password.split("/") if len(p) >= 8)
    if whole and len(value) >= 8:
        found.add(value)
    if found - set(_KNOWN_SECRETS):
        _KNOWN_SECRETS[:] = sorted(found | set(_KNOWN_SECRETS), key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """A URI as people see it, by the rules alone (userinfo, query secrets): what keys shards and
    input roots, so it is the same in every process, whatever secrets each has registered."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", uri)
    text = _BARE_USERINFO.sub("***@", text)
    return _SECRET_FIELDS.sub(r"\g<k>***", text)


def redact_text(text: str, *uris: str) -> str:
    """`text` with URI credentials, connection-string keys, signatures and bearer tokens replaced
    by ***: for anything that reaches a log line, an error message or an output file. The userinfo
    of each of `uris` is also replaced wherever it appears bare (an error that echoes a path
    without its scheme)."""
    for uri in uris:
        for m in _URI_USERINFO.finditer(uri):
            text = text.replace(m.group("cred"), "***")
    text = _BEARER.sub(r"\g<k>***", redact_uri(text))
    for secret in _KNOWN_SECRETS:  # longest first: a secret's pieces never split a longer one
        if secret in text:
            text = text.replace(secret, "***")
    return text


# Key names that hold secrets, compared lower-case with separators dropped, however an option
# spells them (secret_access_key, SecretAccessKey, headers.Authorization, connection_string, sas_token,
# aws_access_key_id, passphrase, apikey ...); "exclude_special_tokens" and "max_batch_tokens" are no secrets.
_SECRET_ENDINGS = (
    "secret", "token", "password", "passwd", "passphrase", "credential", "credentials", "session", "key",
    "keyid", "sas", "auth", "authorization", "connectionstring", "signature", "cookie",
)


def is_secret_key(name: str) -> bool:
    flat = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return flat.endswith(_SECRET_ENDINGS)


def redact(tree: Any) -> Any:
    """A copy of a config tree (or any JSON-able tree) with the values of secret-named keys and
    the credentials inside strings (URI userinfo, AccountKey=, signatures, bearer tokens) replaced."""
    if isinstance(tree, dict):
        return {k: ("***" if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree
