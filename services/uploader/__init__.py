"""The uploader service: turns broadcast jobs into list files on the ESP's SFTP site."""
