"""A real gRPC server and client (grpcio) for the sidecar's per-request gRPC authorization test.

    grpc_authz.py server PORT      serve grpc.health.v1.Health on 127.0.0.1:PORT (h2c) until killed
    grpc_authz.py client HOST:PORT call Health/Check (allowed) and a method the policy does not
                                   allow; print one line per call: `<method> <status code name>`
    grpc_authz.py burst HOST:PORT N
                                   call Health/Check N times in a row on one channel (a rate
                                   limit test); one line per call as above
"""
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def serve(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def call(target):
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            print("Check OK", health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        except grpc.RpcError as e:
            print("Check", e.code().name, e.details())
        # Not in the policy's paths: the sidecar must answer PERMISSION_DENIED (without the
        # sidecar's decision the server itself would say UNIMPLEMENTED).
        forbidden = channel.unary_unary(
            "/grpc.health.v1.Health/List",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            forbidden(health_pb2.HealthCheckRequest(), timeout=10)
            print("List OK")
        except grpc.RpcError as e:
            print("List", e.code().name, e.details())


def burst(target, n):
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(n):
            try:
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                print("Check OK")
            except grpc.RpcError as e:
                print("Check", e.code().name, e.details())


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "burst":
        burst(sys.argv[2], int(sys.argv[3]))
    else:
        call(sys.argv[2])
