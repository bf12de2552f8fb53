"""Event-queue clients (embedded broker and RabbitMQ behind one contract). Built in the issue
"Event queues: an embedded durable broker and RabbitMQ behind one contract"."""
