"""Transport implementations: NATS JetStream, Kafka (aiokafka) and in-memory."""
