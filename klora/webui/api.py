"""The HTTP API: bad K-LoRA args in a txt2img/img2img request are refused with HTTP 422 and a message (the
webui catches exceptions raised in script hooks, so raising there would only log them), and args the webui
would misread are rewritten before it sees them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from klora.webui.args import ARG_NAMES, TITLE, KLoraArgs, KLoraArgsError, from_script_args
from klora.webui.tag import TAG_NAME

API_PATHS: tuple[str, ...] = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

_BETA_POSITION = ARG_NAMES.index("beta")
_PATTERN_POSITION = ARG_NAMES.index("pattern")


def _api_entry(payload: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``alwayson_scripts`` entry for K-LoRA (its key matched case-insensitively, as the webui does)."""
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, Mapping):
        return None
    entry = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == TITLE.lower()), None)
    return entry if isinstance(entry, Mapping) else None


def normalize_api_args(raw: Any) -> Any:
    """The K-LoRA ``args`` of an API request as the webui must receive them; ``raw`` itself when fine.

    * a bare dict of named fields becomes ``[dict]``: modules/api/api.py ``init_script_args`` copies
      ``args[i]`` for ``i < len(args)``, which fails on a dict;
    * a positional list that gives the pattern but stops before β is padded with None through β: the webui
      fills missing trailing args with the panel's values, whose α/β belong to the panel's pattern, not to
      the one given (``[True, c, s, 1, 1, "s*"]`` would get β 0.5); None means "the pattern's default".
      Shorter lists are left alone: the panel's pattern, α and β belong together.
    """
    if isinstance(raw, Mapping):
        return [dict(raw)]
    if isinstance(raw, list) and _PATTERN_POSITION < len(raw) <= _BETA_POSITION \
            and not (raw and isinstance(raw[0], Mapping)):
        return [*raw, *([None] * (_BETA_POSITION + 1 - len(raw)))]
    return raw


def validate_api_payload(payload: Mapping[str, Any],
                         name_exists: Callable[[str], bool] | None = None) -> KLoraArgs | None:
    """Check the ``alwayson_scripts`` entry for K-LoRA of a txt2img/img2img request body.

    Returns the args (None when the request does not mention K-LoRA) or raises :class:`KLoraArgsError`.
    ``args`` may be a list or a bare dict of named fields (see :func:`normalize_api_args`). An enabled entry
    must name both LoRAs unless the prompt carries a ``<klora:`` tag; ``name_exists``, if given, is asked
    about each name (not when a tag is present: the tag's names replace the entry's, and a tag's problems
    are reported with the image, like in the UI).
    """
    entry = _api_entry(payload)
    if entry is None or entry.get("args") is None:
        return None
    raw = normalize_api_args(entry["args"])
    if not isinstance(raw, list):
        raise KLoraArgsError(f'alwayson_scripts["{TITLE}"]["args"] must be a list: the positional values '
                             f"({', '.join(ARG_NAMES)}) or one object of named fields, e.g. "
                             f'[{{"content": "dog", "style": "watercolor"}}]; got {type(raw).__name__}')
    args = from_script_args(raw)
    prompt = payload.get("prompt")
    has_tag = isinstance(prompt, str) and f"<{TAG_NAME}:" in prompt
    if args.enabled and not has_tag:
        args.require_pair()
        if name_exists is not None:
            for name in ("content", "style"):
                value = getattr(args, name)
                if not name_exists(value):
                    raise KLoraArgsError(f"K-LoRA: no LoRA named {value!r} (argument '{name}'); names are "
                                         "file names without extension, as /sdapi/v1/loras lists them", name)
    return args


def prepare_api_payload(payload: dict[str, Any],
                        name_exists: Callable[[str], bool] | None = None) -> bool:
    """Validate (:func:`validate_api_payload`) and normalize the K-LoRA args of ``payload`` in place.

    Returns True when the payload was changed. Raises :class:`KLoraArgsError` for bad args.
    """
    validate_api_payload(payload, name_exists)
    entry = _api_entry(payload)
    if entry is None or entry.get("args") is None:
        return False
    raw = entry["args"]
    fixed = normalize_api_args(raw)
    if fixed is raw or not isinstance(entry, dict):
        return False
    entry["args"] = fixed
    return True


class ApiArgsValidator:
    """Pure ASGI middleware for POSTs to txt2img/img2img: bad K-LoRA args are answered with HTTP 422
    ``{"error": "KLoraArgsError", "detail": message}`` before the webui sees them; args the webui would
    misread are rewritten (:func:`normalize_api_args`). Other requests pass untouched; the body is buffered
    and replayed to the app. Install with ``app.add_middleware(ApiArgsValidator, name_exists=...)``."""

    def __init__(self, app: Any, name_exists: Callable[[str], bool] | None = None,
                 paths: Iterable[str] = API_PATHS):
        self.app = app
        self.name_exists = name_exists
        self.paths = tuple(paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        is_generation = scope.get("type") == "http" and scope.get("method") == "POST" \
            and scope.get("path") in self.paths
        if not is_generation:
            await self.app(scope, receive, send)
            return
        messages: list[Any] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error, new_body = self.prepare(body)
        if error is not None:
            data = json.dumps({"error": "KLoraArgsError", "detail": error}, ensure_ascii=False).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        if new_body is not None:
            rest = [m for m in messages if m.get("type") != "http.request"]
            messages = [{"type": "http.request", "body": new_body, "more_body": False}, *rest]
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(new_body)).encode())]}
        pending = iter(messages)

        async def replay() -> Any:
            for message in pending:
                return message
            return await receive()

        await self.app(scope, replay, send)

    def prepare(self, body: bytes) -> tuple[str | None, bytes | None]:
        """(error message or None, rewritten body or None = forward the body as it came). Bodies that are not
        JSON objects pass: the webui answers those itself."""
        if b"alwayson_scripts" not in body:
            return None, None
        try:
            payload = json.loads(body)
        except ValueError:
            return None, None
        if not isinstance(payload, dict):
            return None, None
        try:
            changed = prepare_api_payload(payload, self.name_exists)
        except KLoraArgsError as err:
            return str(err), None
        return None, (json.dumps(payload, ensure_ascii=False).encode() if changed else None)

    def check(self, body: bytes) -> str | None:
        """The error message for a request body, or None."""
        return self.prepare(body)[0]


def install_api_validation(app: Any, name_exists: Callable[[str], bool] | None = None) -> bool:
    """Put :class:`ApiArgsValidator` in front of a FastAPI/Starlette ``app`` (from ``on_app_started``).

    Starlette refuses ``add_middleware`` once the app has started, which it has by the time the webui calls
    ``on_app_started`` with the UI running; then the built middleware stack is wrapped instead. Installs
    once per app; returns True when it installed.
    """
    if getattr(app, "_klora_api_validation", False):
        return False
    stack = getattr(app, "middleware_stack", None)
    if stack is None:
        app.add_middleware(ApiArgsValidator, name_exists=name_exists)
    else:
        app.middleware_stack = ApiArgsValidator(stack, name_exists)
    app._klora_api_validation = True
    return True
