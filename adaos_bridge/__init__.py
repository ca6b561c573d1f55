"""AdaOS hub bridge: intent requests from the event bus to the service and gated events back."""
