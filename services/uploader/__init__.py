"""The uploader service: turns broadcast jobs into list files on the ESP's SFTP site."""

DESCRIPTION = (
    "Consumes broadcast jobs (broadcast.jobs.v1), streams each job's recipients into the ESP's list "
    "format, uploads the file to the ESP's SFTP drop (temporary name, then rename) and publishes "
    "ListUploaded (broadcast.lists.v1) and the upload stage on broadcast.status.v1."
)
"""What ``python -m services.uploader --help`` says the service does."""
