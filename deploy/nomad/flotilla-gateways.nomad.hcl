# Gateways: a service job of two, registered as "flotilla-gateway" with an HTTP health check,
# for a load balancer (or Consul/Nomad service discovery) to send clients to.
job "flotilla-gateways" {
  type = "service"

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
  }

  group "gateway" {
    count = 2
    network {
      port "http" { static = 8080 }
      port "metrics" {}
    }
    task "gateway" {
      driver = "exec"
      config {
        command = "/usr/local/bin/flotilla"
        args    = ["gateway", "--config", "${NOMAD_TASK_DIR}/gateway.toml"]
      }
      kill_timeout = "60s"
      template {
        destination = "${NOMAD_TASK_DIR}/gateway.toml"
        data        = <<-EOT
          server = "{{ range $i, $s := nomadService `flotilla-server` }}{{ if $i }},{{ end }}{{ $s.Address }}:7070{{ end }}"
          listen = "{{ env `NOMAD_ADDR_http` }}"
          metrics_listen = "{{ env `NOMAD_ADDR_metrics` }}"
          tls_cert = "/etc/flotilla/tls/gateway.pem"
          tls_key = "/etc/flotilla/tls/gateway-key.pem"
          tls_ca = "/etc/flotilla/tls/ca.pem"
          # Models' tokenizer files (kv-aware routing), kept with the allocation
          tokenizer_cache = "{{ env `NOMAD_ALLOC_DIR` }}/data/tokenizers"
        EOT
      }
      service {
        name     = "flotilla-gateway"
        port     = "http"
        provider = "nomad"
        check {
          type     = "http"
          path     = "/health"
          interval = "5s"
          timeout  = "2s"
        }
      }
      resources {
        cpu    = 1000
        memory = 256
      }
    }
  }
}
