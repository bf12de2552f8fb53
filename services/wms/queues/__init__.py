"""The WMS's event queues: the broker protocol, the embedded and RabbitMQ brokers, the RabbitMQ
admin, the queue manager and EventService."""
