"""The gRPC edge: generated code, proto <-> model conversion, status mapping, servicers, SDK."""
