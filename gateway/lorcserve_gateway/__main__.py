"""Command line: /usr/bin/python3 -m lorcserve_gateway --coordinator HOST:PORT [flags]
(scripts/gateway.sh sets PYTHONPATH and the stubs; gateway/README.md lists the flags)."""

import argparse
import os
import sys

from . import stubs
from .chat_template import ChatTemplateError

DEFAULT_PORT = 8000
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # as the coordinator's --drain-timeout-s
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _port(text):
    """argparse type of --port: an int in [0, 65535] (bind() raised OverflowError past it)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {port}")
    return port


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lorcserve-gateway",
                                description="OpenAI-compatible HTTP gateway for a lorcserve "
                                            "coordinator")
    p.add_argument("--coordinator", required=True,
                   help="the coordinator's public gRPC address HOST:PORT (its --listen)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"HTTP port (default {DEFAULT_PORT}; 0: any free port, printed)")
    p.add_argument("--served-model-name",
                   help="the model id clients send (default: the base name of the coordinator's "
                        "--model)")
    p.add_argument("--model-dir",
                   help="where tokenizer_config.json / tokenizer.json are (default: the "
                        "coordinator's --model, as ModelInfo reports it)")
    p.add_argument("--chat-template", help="a Jinja chat template file replacing the model's")
    p.add_argument("--auth-token-file",
                   help="bearer tokens clients must send (one a line, as the coordinator's "
                        "flag); the caller's token is forwarded to the coordinator either way")
    p.add_argument("--tls-ca", help="verify the coordinator's TLS certificate with this CA "
                                    "bundle (TLS on; default plaintext)")
    p.add_argument("--tls-server-name", help="the name to verify instead of the address's host")
    p.add_argument("--tls-cert", help="a client certificate (PEM chain) to present to a "
                                      "coordinator that requires one (its --tls-client-ca)")
    p.add_argument("--tls-key", help="the --tls-cert's unencrypted PEM private key")
    p.add_argument("--stubs-dir", default=os.environ.get("LORC_GATEWAY_STUBS"),
                   help="where the generated gRPC stubs are (default $LORC_GATEWAY_STUBS)")
    p.add_argument("--proto-dir", default=None,
                   help="generate the stubs from this proto/ folder when missing or stale")
    p.add_argument("--drain-timeout-s", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM / SIGINT, requests in flight get this long to finish "
                        f"before the gateway exits anyway (default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="uvicorn log level (default warning)")
    args = p.parse_args(argv)
    if not args.coordinator.strip():
        p.error("--coordinator: empty address (HOST:PORT)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        p.error("--served-model-name: empty name (leave the flag out for the model's own)")
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        p.error("--tls-cert needs --tls-ca (TLS to the coordinator)")
    if not args.drain_timeout_s >= 0:  # also NaN
        p.error(f"--drain-timeout-s: must be >= 0, got {args.drain_timeout_s}")
    return args


# After the drain's end has answered every request in flight, the gateway exits anyway this
# many seconds later (a client that does not read its last bytes must not hold it).
END_GRACE_S = 2.0


def _draining_server(config, drain_timeout_s, gateway):
    """uvicorn's server, whose graceful shutdown waits for every connection and request without
    limit (this uvicorn has no timeout_graceful_shutdown). The first SIGTERM / SIGINT stops
    accepting; drain_timeout_s later, or at a second signal, every request still in flight is
    answered 503 (a stream: an error event, then [DONE]; Gateway.end_requests), and END_GRACE_S
    after that the server exits anyway (force_exit, which its loop reads every 0.1 s).
    uvicorn calls handle_exit on the event loop (loop.add_signal_handler)."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        ending = False

        def handle_exit(self, sig, frame):
            loop = asyncio.get_event_loop()
            if not self.should_exit:
                self.should_exit = True  # stop accepting; uvicorn waits for the connections
                loop.call_later(drain_timeout_s, self.end_requests, loop,
                                f"the drain timeout ({drain_timeout_s:g} s) ended this request")
            else:
                self.end_requests(loop, "a second termination signal ended the drain")

        def end_requests(self, loop, why):
            if self.ending:
                return
            self.ending = True
            gateway.end_requests(why)
            loop.call_later(END_GRACE_S, setattr, self, "force_exit", True)

    return DrainingServer(config)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.stubs_dir:
        print("lorcserve-gateway: --stubs-dir (or $LORC_GATEWAY_STUBS) is required",
              file=sys.stderr)
        return 2
    try:
        pb2, pb2_grpc = stubs.load(args.stubs_dir, args.proto_dir)
    except stubs.StubError as e:
        print(f"lorcserve-gateway: {e}", file=sys.stderr)
        return 2
    import socket

    import uvicorn

    from .server import Gateway, Options, create_app
    try:
        gateway = Gateway(Options(args.coordinator, args.served_model_name, args.model_dir,
                                  args.chat_template, args.auth_token_file, args.tls_ca,
                                  args.tls_server_name, args.tls_cert, args.tls_key),
                          pb2, pb2_grpc)
    except (ChatTemplateError, ValueError, OSError) as e:
        print(f"lorcserve-gateway: {e}", file=sys.stderr)
        return 2
    # Bind here so that port 0 can be reported before serving (tests, scripts).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections queue from GATEWAY_LISTENING on, before uvicorn serves
    except OSError as e:
        print(f"lorcserve-gateway: --host {args.host} --port {args.port}: {e.strerror}",
              file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(gateway), log_level=args.log_level, access_log=False)
    server = _draining_server(config, args.drain_timeout_s, gateway)
    print(f"GATEWAY_LISTENING {host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
