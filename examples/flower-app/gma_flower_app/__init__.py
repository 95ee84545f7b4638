"""gma-flower-app: a Flower App aggregating with gradient masked averaging."""
