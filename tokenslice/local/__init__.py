"""The whole tokenslice data plane on loopback (``tokenslice local up``) and its reusable supervisor."""

from tokenslice.local.stack import DataPlane, EnginePool, LocalConfig, LocalStack

__all__ = ["DataPlane", "EnginePool", "LocalConfig", "LocalStack"]
