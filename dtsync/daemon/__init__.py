"""The long-running service: MQTT ingest, per-twin monitors, durable events, metrics, systemd integration."""
