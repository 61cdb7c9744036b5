"""Re-export of `hyperrouter.routers.losses` (the losses live with the routers that use them)."""

from hyperrouter.routers.losses import at_least_fp32, router_z_loss, switch_balance_loss

__all__ = ["at_least_fp32", "router_z_loss", "switch_balance_loss"]
