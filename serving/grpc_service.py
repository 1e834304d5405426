"""What Ray Serve's gRPC proxy loads to serve ``moestream.v1.Ranking``: the service's registration, nothing more.

The proxy imports :data:`SERVICER_FUNCTION` in its own process, so this module imports grpc and the generated
messages only (no torch, FastAPI or Feast). It registers the generated service with requests left as bytes:
the replica parses them (``serving.grpc_api``) and answers bytes that are not a ``RankRequest`` with
INVALID_ARGUMENT and why, where grpcio, parsing in the proxy, would answer INTERNAL ("Exception deserializing
request!"), a server error for the client's mistake. Responses are serialized as the generated code does.
"""

from __future__ import annotations

from typing import Any

import grpc

from serving.proto import ranking_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Ranking"].full_name
SERVICER_FUNCTION = f"{__name__}.add_ranking_servicer"
"""What ``gRPCOptions.grpc_servicer_functions`` names."""


def add_ranking_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register ``moestream.v1.Ranking`` on ``server`` (Serve replaces the handlers' bodies with its routing to
    the deployment method of the same name, ``Rank`` or ``Health``)."""
    handlers = {
        "Rank": grpc.unary_unary_rpc_method_handler(servicer.Rank,
                                                    response_serializer=pb.RankResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(servicer.Health,
                                                      response_serializer=pb.HealthResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


__all__ = ["SERVICE", "SERVICER_FUNCTION", "add_ranking_servicer"]
