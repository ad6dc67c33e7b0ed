{
  "targets": [
    {
      "target_name": "blockd_native",
      "sources": ["blockd_native.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-Wall", "-Wextra"]
    }
  ]
}
