"""espbridge's services: uploader, monitor, gatherer, loader. They meet only on Kafka topics."""
