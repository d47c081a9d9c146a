"""Fleet: decisions published to the plant's MQTT broker, with an on-disk store-and-forward spool."""
